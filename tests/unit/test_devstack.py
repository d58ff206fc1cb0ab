"""The local-stack helpers that need no LLM: backends file generation, the children's
environment, and how a child that dies while starting is reported."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import yaml

from semroute.backends import load_backends
from semroute.devstack import (
    ManagedProcess,
    StackError,
    child_env,
    wait_until,
    write_backends,
)
from semroute.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "deploy" / "backends.yaml"


def test_generated_backends_point_local_targets_at_run_time_ports(tmp_path: Path) -> None:
    """The generated file is the template with only the local targets' base_url replaced, and
    it still loads as a valid backends file."""
    out = write_backends(
        TEMPLATE,
        tmp_path / "b.yaml",
        {"local-small": "http://127.0.0.1:4001/v1", "local-large": "http://127.0.0.1:4002/v1"},
    )
    loaded = load_backends(out)
    template = load_backends(TEMPLATE)
    assert loaded["local-small"].base_url == "http://127.0.0.1:4001/v1"
    assert loaded["local-large"].base_url == "http://127.0.0.1:4002/v1"
    assert loaded["gpt-4o"] == dataclasses.replace(template["gpt-4o"], source=str(out))
    assert list(loaded) == list(template)


def test_template_without_a_local_target_is_a_config_error(tmp_path: Path) -> None:
    """Asking to rewrite a target the template lacks names the file and the missing entry."""
    template = tmp_path / "t.yaml"
    template.write_text(yaml.safe_dump({"backends": {"gpt-4o": {"base_url": "https://x/v1",
                                                                "model": "gpt-4o"}}}))
    with pytest.raises(ConfigError, match=r"t\.yaml: backends\.local-small: missing"):
        write_backends(template, tmp_path / "out.yaml", {"local-small": "http://127.0.0.1:1/v1"})


def test_child_env_withholds_cloud_keys_unless_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stack children never see OPENAI_API_KEY unless cloud targets are allowed."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert "OPENAI_API_KEY" not in child_env()
    assert child_env(allow_cloud=True)["OPENAI_API_KEY"] == "sk-test"
    assert child_env()["HF_HUB_OFFLINE"] == "1"


def test_a_child_that_dies_while_starting_is_reported_with_its_log(tmp_path: Path) -> None:
    """A process that exits before it is ready raises StackError with its exit code and the
    tail of its log, instead of waiting for the timeout."""
    proc = ManagedProcess(
        name="broken",
        argv=[sys.executable, "-c", "print('cannot load model: bad magic'); raise SystemExit(3)"],
        log_path=tmp_path / "broken.log",
        env=child_env(),
    )
    proc.start()
    try:
        with pytest.raises(StackError) as info:
            wait_until(proc, lambda: False, timeout=30.0, what="ready")
    finally:
        proc.stop()
    message = str(info.value)
    assert "exit code 3" in message
    assert "cannot load model: bad magic" in message
    assert "broken.log" in message
