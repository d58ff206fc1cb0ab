"""TLS credentials for the gRPC servers (mutual TLS when a client CA is given) and clients."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc

from semroute.config import TlsSettings
from semroute.errors import ConfigError
from semroute.logs import clean_request_id


def _read_file(path: Path | None, field: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path}: {exc.strerror}") from exc


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from ``tls`` (None when no certificate is configured: plaintext).

    With ``client_ca_file`` set, clients must present a certificate signed by that CA (mTLS).
    Raises ConfigError naming the field when a file is missing or the settings are incomplete.
    """
    if tls.cert_file is None and tls.key_file is None:
        if tls.client_ca_file is not None:
            raise ConfigError("tls.client_ca_file needs tls.cert_file and tls.key_file as well")
        return None
    if tls.cert_file is None or tls.key_file is None:
        missing = "tls.cert_file" if tls.cert_file is None else "tls.key_file"
        raise ConfigError(f"{missing} is required when the other of cert_file/key_file is set")
    cert = _read_file(tls.cert_file, "tls.cert_file")
    key = _read_file(tls.key_file, "tls.key_file")
    ca = _read_file(tls.client_ca_file, "tls.client_ca_file")
    assert cert is not None and key is not None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def channel_credentials(
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
) -> grpc.ChannelCredentials:
    """Client TLS credentials: trust ``ca_file`` (system roots if None); present a client
    certificate when ``cert_file`` and ``key_file`` are given (mTLS)."""
    if (cert_file is None) != (key_file is None):
        raise ConfigError("client TLS needs both a certificate and a key file, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_file(ca_file, "tls_ca"),
        private_key=_read_file(key_file, "tls_key"),
        certificate_chain=_read_file(cert_file, "tls_cert"),
    )


def open_channel(
    addr: str,
    tls_ca: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    options: Sequence[tuple[str, int | str]] | None = None,
) -> grpc.aio.Channel:
    """A client channel to ``addr``: TLS when a CA or a client certificate is given (mutual TLS
    with ``tls_cert`` + ``tls_key``), plaintext otherwise. Both clients open theirs here."""
    if tls_ca is not None or tls_cert is not None:
        return grpc.aio.secure_channel(
            addr, channel_credentials(tls_ca, tls_cert, tls_key), options=options
        )
    return grpc.aio.insecure_channel(addr, options=options)


def call_metadata(token: str | None, request_id: str | None) -> list[tuple[str, str]]:
    """The metadata a client sends: its bearer token and the request id, when there are."""
    metadata = []
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    # Metadata must be printable ASCII (grpc refuses the call otherwise, as INTERNAL): an id
    # that is not is left out here, and the server labels the call with one of its own.
    if request_id and clean_request_id(request_id) == request_id:
        metadata.append(("x-request-id", request_id))
    return metadata
