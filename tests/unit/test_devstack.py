"""The local-stack helpers that need no LLM: backends file generation, the children's
environment, how a child that dies while starting is reported, and that no child outlives its
parent (PR_SET_PDEATHSIG) or a stop."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from semroute.dispatch.backend_config import load_backends
from semroute.errors import ConfigError, StackError
from semroute.testing import devstack
from semroute.testing.devstack import (
    DevStack,
    ManagedProcess,
    child_env,
    die_with_parent,
    wait_until,
    write_backends,
)
from tests.proctree import ProcId, alive, identify, wait_all_gone

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only"
)

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


# A parent that starts a long sleeper in its own session (as the stack starts its services),
# prints the sleeper's pid, then waits to be killed.
_PARENT = textwrap.dedent("""
    import subprocess, sys, time
    from semroute.testing.devstack import die_with_parent
    guard = die_with_parent() if sys.argv[1] == "guarded" else None
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                             start_new_session=True, preexec_fn=guard)
    print(child.pid, flush=True)
    time.sleep(300)
""")


def _parent_and_child(mode: str) -> tuple[subprocess.Popen[str], ProcId]:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, mode], stdout=subprocess.PIPE, text=True,
        preexec_fn=die_with_parent(),
    )
    assert parent.stdout is not None
    line = parent.stdout.readline()
    child = identify(int(line))
    assert child is not None and alive(child), line
    return parent, child


def _kill(proc: ProcId) -> None:
    if alive(proc):
        import os

        os.kill(proc.pid, signal.SIGKILL)


@linux_only
def test_a_child_in_its_own_session_dies_when_its_parent_is_sigkilled() -> None:
    """With die_with_parent the kernel kills the child (own session and all) once its parent
    is SIGKILLed, with no chance to clean up."""
    parent, child = _parent_and_child("guarded")
    with parent:
        try:
            parent.kill()
            parent.wait(10)
            assert wait_all_gone([child], timeout=5.0) == []
        finally:
            _kill(child)


@linux_only
def test_without_the_guard_the_child_outlives_its_parent() -> None:
    """The control for the test above: a child in its own session without die_with_parent is
    still running after its parent was SIGKILLed (so that test can fail)."""
    parent, child = _parent_and_child("unguarded")
    with parent:
        try:
            parent.kill()
            parent.wait(10)
            assert wait_all_gone([child], timeout=1.0) == [child]
        finally:
            _kill(child)


def test_no_death_signal_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where prctl does not exist, die_with_parent gives no preexec_fn (and does not fail)."""
    monkeypatch.setattr(devstack.sys, "platform", "darwin")
    assert die_with_parent() is None
    assert devstack.die_with_my_parent() is False


def test_stop_kills_a_child_that_ignores_sigint_at_the_deadline(tmp_path: Path) -> None:
    """A service that ignores the polite SIGINT is SIGKILLed when the stop deadline passes,
    so stopping a stack always ends with nothing running."""
    code = (
        "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(300)"
    )
    proc = ManagedProcess(
        name="stubborn", argv=[sys.executable, "-c", code], log_path=tmp_path / "s.log",
        env=child_env(),
    )
    proc.start()
    wait_until(proc, lambda: "ready" in proc.log_tail(), timeout=30.0, what="ready")
    stack = DevStack(log_dir=tmp_path, dispatcher=None)
    stack.llamas["stubborn"] = proc  # type: ignore[assignment]
    stack.stop(timeout=0.5)
    assert proc.popen is not None and proc.popen.returncode == -signal.SIGKILL
