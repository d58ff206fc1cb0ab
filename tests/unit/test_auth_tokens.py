"""Bearer-token parsing and roles (the pure part of the auth interceptor)."""

from __future__ import annotations

from pathlib import Path

import pytest

from semroute.auth import TokenSet
from semroute.config import AuthSettings
from semroute.errors import ConfigError
from semroute.grpc.interceptors import bearer_token


def test_roles_admin_user_unknown() -> None:
    """Admin tokens map to "admin", user tokens to "user", anything else to None."""
    tokens = TokenSet.of(user=["u1", "u2"], admin=["a1"])
    assert tokens.enabled
    assert tokens.role("a1") == "admin"
    assert tokens.role("u2") == "user"
    assert tokens.role("u3") is None
    assert tokens.role("") is None
    assert tokens.role("u1 ") is None  # no trimming inside the comparison


def test_no_tokens_means_auth_off() -> None:
    """Without any configured token auth is disabled (development mode)."""
    assert not TokenSet.of().enabled
    assert not TokenSet.from_settings(AuthSettings()).enabled


def test_only_digests_are_kept() -> None:
    """The token set never holds a token in the clear."""
    tokens = TokenSet.of(user=["secret-user"], admin=["secret-admin"])
    assert b"secret" not in b"".join(tokens.user + tokens.admin)


def test_tokens_from_files(tmp_path: Path) -> None:
    """Token files hold one token per line; blank lines and # comments are ignored."""
    users = tmp_path / "tokens"
    users.write_text("# routing clients\nalpha\n\n  beta  \n")
    admins = tmp_path / "admins"
    admins.write_text("root\n")
    tokens = TokenSet.from_settings(
        AuthSettings(tokens=["env-token"], tokens_file=users, admin_tokens_file=admins)
    )
    names = ("alpha", "beta", "env-token", "root", "# routing clients")
    assert [tokens.role(t) for t in names] == ["user", "user", "user", "admin", None]


def test_unreadable_or_empty_token_file_names_the_field(tmp_path: Path) -> None:
    """A missing or empty token file is a ConfigError naming the setting and the path."""
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=r"auth.tokens_file: cannot read .*nope"):
        TokenSet.from_settings(AuthSettings(tokens_file=missing))
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match=r"auth.admin_tokens_file: .*empty holds no token"):
        TokenSet.from_settings(AuthSettings(admin_tokens_file=empty))


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ((("authorization", "Bearer abc"),), "abc"),
        ((("authorization", "bearer   abc "),), "abc"),
        ((("authorization", "Basic abc"),), None),
        ((("authorization", "Bearer"),), None),
        ((("x-other", "Bearer abc"),), None),
        ((), None),
        ((("authorization", b"Bearer raw"),), "raw"),
    ],
)
def test_bearer_token_parsing(
    metadata: tuple[tuple[str, str | bytes], ...], expected: str | None
) -> None:
    """Only `authorization: Bearer <token>` yields a token; other schemes and keys do not."""
    assert bearer_token(metadata) == expected
