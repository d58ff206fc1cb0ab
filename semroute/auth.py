"""Bearer tokens, shared by both doors (gRPC metadata and HTTP headers).

Tokens are kept as sha256 digests and compared in constant time against every configured token,
so timing leaks neither which token matched nor its length. ``parse_bearer`` is the one parser
of an ``authorization: Bearer <token>`` value.

Tenants: a line of a token file is ``TOKEN`` or ``NAME TOKEN``; the name is the tenant the
dispatcher's budgets, rate limits, cost counters and cache scope use. A token without a name
is its own tenant, ``token-`` plus the first 8 hex digits of its sha256 (stable, and it
reveals nothing usable). Tokens given in the environment have no names.
"""

from __future__ import annotations

import hashlib
import hmac
import re
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


TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def anonymous_tenant(digest: bytes) -> str:
    """The tenant name of a token listed without one."""
    return f"token-{digest.hex()[:8]}"


@dataclass(frozen=True)
class TokenSet:
    """Bearer tokens (sha256 digests only) for users and admins. Admins may call everything.
    ``names`` maps digests to tenant names (tokens without one are absent)."""

    user: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()
    names: tuple[tuple[bytes, str], ...] = ()

    @classmethod
    def of(
        cls, user: Iterable[str] = (), admin: Iterable[str] = (),
        names: dict[str, str] | None = None,
    ) -> TokenSet:
        """``names``: token -> tenant name, for the tokens that have one."""
        named = tuple((_digest(t), n) for t, n in (names or {}).items())
        return cls(
            tuple(_digest(t) for t in user if t), tuple(_digest(t) for t in admin if t), named
        )

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> TokenSet:
        """Tokens from ``auth.tokens`` / ``auth.admin_tokens`` plus their files (one per line,
        ``#`` comments and blank lines ignored). Raises ConfigError naming an unreadable file."""
        user_lines = _read_named(auth.tokens_file, "auth.tokens_file")
        admin_lines = _read_named(auth.admin_tokens_file, "auth.admin_tokens_file")
        names = {t: n for n, t in (*user_lines, *admin_lines) if n is not None}
        user = [*auth.tokens, *(t for _, t in user_lines)]
        admin = [*auth.admin_tokens, *(t for _, t in admin_lines)]
        return cls.of(user, admin, names)

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

    def tenant(self, token: str) -> str | None:
        """The tenant ``token`` belongs to (its name in the token file, else ``token-<8 hex>``),
        or None for an unknown token. Compares against every named token."""
        if self.role(token) is None:
            return None
        candidate = _digest(token)
        found: str | None = None
        for known, name in self.names:
            if hmac.compare_digest(candidate, known):
                found = name
        return found if found is not None else anonymous_tenant(candidate)

    def tenant_names(self) -> set[str]:
        """Every tenant name the token files define."""
        return {name for _, name in self.names}


def read_tokens_file(path: Path, field: str) -> list[str]:
    """The tokens in ``path`` (one per line; blank lines and ``#`` comments skipped). Raises
    ConfigError naming ``field`` when the file is unreadable or holds no token."""
    return _read_tokens(path, field)


def _read_tokens(path: Path | None, field: str) -> list[str]:
    return [token for _, token in _read_named(path, field)]


def _read_named(path: Path | None, field: str) -> list[tuple[str | None, str]]:
    """(name or None, token) per line: ``TOKEN`` or ``NAME TOKEN``."""
    if path is None:
        return []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path}: {exc.strerror}") from exc
    found: list[tuple[str | None, str]] = []
    for number, line in enumerate(lines, 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) == 1:
            found.append((None, parts[0]))
        elif len(parts) == 2 and TENANT_NAME.fullmatch(parts[0]):
            found.append((parts[0], parts[1]))
        else:
            raise ConfigError(
                f"{field}: {path}:{number}: expected `TOKEN` or `NAME TOKEN` (NAME: letters, "
                "digits, '_', '.', '-', at most 64)"
            )
    if not found:
        raise ConfigError(f"{field}: {path} holds no token (one per line)")
    return found
