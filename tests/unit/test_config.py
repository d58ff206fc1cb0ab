"""Settings: file < environment < explicit overrides, readable errors, token lists from env."""

from __future__ import annotations

from pathlib import Path

import pytest

from semroute.config import load_settings
from semroute.errors import ConfigError
from tests.conftest import write


def test_precedence_file_then_env_then_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A YAML file sets values, SEMROUTE_* env beats it, explicit overrides beat both."""
    cfg = write(
        tmp_path / "c.yaml", "decision: {k: 7, temperature: 0.1}\nrouter_server: {port: 6000}\n"
    )
    monkeypatch.setenv("SEMROUTE_DECISION__K", "12")
    s = load_settings(cfg, router_server__port=7000)
    assert s.decision.k == 12  # env over file
    assert s.decision.temperature == 0.1  # file over default
    assert s.router_server.port == 7000  # override over file


def test_comma_separated_tokens_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """SEMROUTE_AUTH__TOKENS=a,b gives two tokens (the way env files write lists)."""
    monkeypatch.setenv("SEMROUTE_AUTH__TOKENS", "alpha, beta")
    monkeypatch.setenv("SEMROUTE_AUTH__ADMIN_TOKENS", '["root"]')
    s = load_settings()
    assert s.auth.tokens == ["alpha", "beta"] and s.auth.admin_tokens == ["root"]


def test_bad_values_name_file_and_field(tmp_path: Path) -> None:
    """An invalid value is a ConfigError naming the file and the dotted field."""
    cfg = write(tmp_path / "c.yaml", "decision: {k: 0}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: decision\.k: Input should be greater than"):
        load_settings(cfg)
    with pytest.raises(ConfigError, match=r"d\.yaml: nonsense: Extra inputs are not permitted"):
        load_settings(write(tmp_path / "d.yaml", "nonsense: {a: 1}\n"))
