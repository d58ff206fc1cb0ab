"""Shared fixtures. Unit tests need no model; integration tests use the real exported encoder
and the default index that `make setup` builds (both are created on demand if missing)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from semroute import config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ENCODER_DIR = REPO / config.DEFAULT_ENCODER_DIR  # served by default (int8)
FP32_ENCODER_DIR = REPO / config.FP32_ENCODER_DIR  # the reference export
DEFAULT_INDEX = REPO / "index_data" / "build" / "default"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Before grpc is imported: with gRPC's fork support on, a child started with a preexec_fn
# (every test server: die_with_parent) can abort between fork and exec when the pytest process
# runs gRPC servers or channels ("epoll_wait error: Bad file descriptor", exit -6). Measured:
# 3 of 150 such starts with it on, 0 of 150 with it off. Nothing here forks without exec.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")


class HashEncoder:
    """A deterministic stand-in encoder for unit tests of the index artifact and decisions:
    texts sharing words get similar vectors. Never used where the real encoder matters."""

    def __init__(self, dimension: int = 32, fingerprint: str = "sha256:test-hash-encoder") -> None:
        self._dimension = dimension
        self._fingerprint = fingerprint

    @property
    def dimension(self) -> int:
        return self._dimension

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self._dimension), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                h = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little")
                out[i, h % self._dimension] += 1.0
            norm = np.linalg.norm(out[i])
            if norm:
                out[i] /= norm
        return out


@pytest.fixture
def hash_encoder() -> HashEncoder:
    return HashEncoder()


def _ensure(path: Path, make_target: str) -> None:
    if not path.exists():
        subprocess.run(["make", "-C", str(REPO), make_target], check=True)


@pytest.fixture(scope="session")
def encoder_dir() -> Path:
    _ensure(ENCODER_DIR / "manifest.json", str(config.DEFAULT_ENCODER_DIR / "manifest.json"))
    return ENCODER_DIR


@pytest.fixture(scope="session")
def fp32_encoder_dir() -> Path:
    _ensure(FP32_ENCODER_DIR / "manifest.json", str(config.FP32_ENCODER_DIR / "manifest.json"))
    return FP32_ENCODER_DIR


@pytest.fixture(scope="session")
def fp32_encoder(fp32_encoder_dir: Path):  # type: ignore[no-untyped-def]
    from semroute.encoder import OnnxEncoder

    return OnnxEncoder.load(fp32_encoder_dir)


@pytest.fixture(scope="session")
def onnx_encoder(encoder_dir: Path):  # type: ignore[no-untyped-def]
    from semroute.encoder import OnnxEncoder

    return OnnxEncoder.load(encoder_dir)


@pytest.fixture(scope="session")
def default_index(encoder_dir: Path) -> Path:
    _ensure(
        DEFAULT_INDEX / "current" / "manifest.json",
        "index_data/build/default/current/manifest.json",
    )
    return DEFAULT_INDEX


@pytest.fixture(scope="session")
def default_router(default_index: Path, encoder_dir: Path):  # type: ignore[no-untyped-def]
    from semroute.router import Router

    return Router.load(default_index, encoder_path=encoder_dir)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(
            f"shared datasets not found at {SHARED_DATA} (CI places ../shared beside the repo)"
        )
    return SHARED_DATA


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def run_cli(
    *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the real `semroute` command in a subprocess (from the repo's venv)."""
    exe = Path(sys.executable).with_name("semroute")
    return subprocess.run(
        [str(exe), *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        check=check,
        timeout=300,
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by folder so `-m "not e2e"` and friends work without per-file boilerplate."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        elif "e2e" in parts:
            item.add_marker(pytest.mark.e2e)
