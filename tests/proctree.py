"""Linux process-tree helpers for tests that check no process outlives its parent (read from
/proc: psutil is not a dependency)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcId:
    """A process as (pid, start time): a pid alone may be reused once the process is gone."""

    pid: int
    start: int
    cmdline: str


def _stat(pid: int) -> list[str] | None:
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) is parenthesised and may contain spaces: split after its closing paren.
    head, _, tail = raw.rpartition(")")
    return [head.split(" (", 1)[0], head.split(" (", 1)[-1], *tail.split()]


def _cmdline(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def identify(pid: int) -> ProcId | None:
    fields = _stat(pid)
    if fields is None:
        return None
    return ProcId(pid, int(fields[21]), _cmdline(pid))


def alive(proc: ProcId) -> bool:
    """True while the process exists and is not a zombie (a zombie has exited and holds no
    port; whether anyone reaps it depends on the container's init)."""
    fields = _stat(proc.pid)
    if fields is None or int(fields[21]) != proc.start:
        return False
    return fields[2] not in ("Z", "X")


def descendants(root: int) -> list[ProcId]:
    """Every living process below ``root`` (children, grandchildren, ...), found by ppid."""
    parents: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is not None:
            parents.setdefault(int(fields[3]), []).append(int(entry.name))
    found: list[ProcId] = []
    todo = list(parents.get(root, []))
    while todo:
        pid = todo.pop()
        ident = identify(pid)
        if ident is not None and alive(ident):
            found.append(ident)
        todo.extend(parents.get(pid, []))
    return found


def wait_all_gone(procs: Iterable[ProcId], timeout: float) -> list[ProcId]:
    """Poll until none of ``procs`` is alive or ``timeout`` passes; returns the survivors."""
    procs = list(procs)
    deadline = time.monotonic() + timeout
    while True:
        survivors = [p for p in procs if alive(p)]
        if not survivors or time.monotonic() >= deadline:
            return survivors
        time.sleep(0.05)
