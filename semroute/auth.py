"""Bearer tokens, shared by both doors (gRPC metadata and HTTP headers).

Tokens are kept as sha256 digests and compared in constant time against every configured token,
so timing leaks neither which token matched nor its length. ``parse_bearer`` is the one parser
of an ``authorization: Bearer <token>`` value.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from semroute.config import AuthSettings
from semroute.errors import ConfigError


def parse_bearer(value: str | None) -> str | None:
    """The token of an ``authorization`` value ``Bearer <token>`` (scheme case-insensitive), or
    None when the value is absent, of another scheme, or carries no token."""
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _digest(token: str) -> bytes:
    # Hashing first gives equal-length inputs to compare_digest, so timing leaks neither the
    # token's content nor its length.
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True)
class TokenSet:
    """Bearer tokens (sha256 digests only) for users and admins. Admins may call everything."""

    user: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()

    @classmethod
    def of(cls, user: Iterable[str] = (), admin: Iterable[str] = ()) -> TokenSet:
        return cls(tuple(_digest(t) for t in user if t), tuple(_digest(t) for t in admin if t))

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> TokenSet:
        """Tokens from ``auth.tokens`` / ``auth.admin_tokens`` plus their files (one per line,
        ``#`` comments and blank lines ignored). Raises ConfigError naming an unreadable file."""
        user = [*auth.tokens, *_read_tokens(auth.tokens_file, "auth.tokens_file")]
        admin = [
            *auth.admin_tokens,
            *_read_tokens(auth.admin_tokens_file, "auth.admin_tokens_file"),
        ]
        return cls.of(user, admin)

    @property
    def enabled(self) -> bool:
        """Auth is on as soon as any token is configured."""
        return bool(self.user or self.admin)

    def role(self, token: str) -> str | None:
        """``"admin"``, ``"user"`` or None (unknown). Compares against every token."""
        candidate = _digest(token)
        is_admin = False
        is_user = False
        for known in self.admin:
            is_admin |= hmac.compare_digest(candidate, known)
        for known in self.user:
            is_user |= hmac.compare_digest(candidate, known)
        if is_admin:
            return "admin"
        return "user" if is_user else None


def read_tokens_file(path: Path, field: str) -> list[str]:
    """The tokens in ``path`` (one per line; blank lines and ``#`` comments skipped). Raises
    ConfigError naming ``field`` when the file is unreadable or holds no token."""
    return _read_tokens(path, field)


def _read_tokens(path: Path | None, field: str) -> list[str]:
    if path is None:
        return []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path}: {exc.strerror}") from exc
    tokens = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not tokens:
        raise ConfigError(f"{field}: {path} holds no token (one per line)")
    return tokens
