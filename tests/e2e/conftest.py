"""One real stack for the whole e2e session: a llama.cpp server with SmolLM2-135M-Instruct
(serving both local targets: the CI box has 2 cores), the router on the default index and the
dispatcher with its HTTP door, each a real process on a free loopback port. The processes are
started from the main thread with PR_SET_PDEATHSIG (``semroute.testing.devstack``), so they die
with the test session even when pytest itself is killed."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from semroute.config import DEFAULT_ENCODER_DIR, DEFAULT_INDEX_DIR
from semroute.testing.devstack import DevStack, StackPorts

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    index = REPO / DEFAULT_INDEX_DIR
    encoder = REPO / DEFAULT_ENCODER_DIR
    missing = [str(p) for p in (index / "current", encoder) if not p.exists()]
    if importlib.util.find_spec("llama_cpp") is None:
        missing.append("llama-cpp-python[server]")
    if missing:
        # Fail, not skip: a silently skipped e2e suite hides a broken stack.
        pytest.fail(f"e2e stack needs {', '.join(missing)}: run `make setup`")
    log_dir = tmp_path_factory.mktemp("stack")
    with DevStack.start(
        log_dir,
        index=index,
        encoder=encoder,
        shared_llama=True,
        ports=StackPorts(http=0),
        backends_template=REPO / "deploy" / "backends.yaml",
    ) as started:
        yield started
