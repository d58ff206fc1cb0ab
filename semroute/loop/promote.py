"""Promotion and rollback: which index version serves, switched by hand, with who, when and why.

``promote(root, version)`` checks the version in full (checksums, FAISS, the same encoder as
the version serving now), then moves ``ROOT/current`` with the builds' own atomic switch
(``semroute.index.switch_current``: a new symlink renamed over the old one, so a reader sees the
old version or the new one, never neither), then appends a line to ``ROOT/promotions.jsonl``.
A serving router's watch (or a ``ReloadIndex`` call) picks the new version up as after a build.

The history is append-only and is the record of what was promoted: promotions push a version on
a stack, rollbacks pop it. ``rollback(root)`` switches to the version below the one serving;
when ``current`` was moved outside promotions (a build), it switches back to the last promoted
version. Promotions and rollbacks of one root are serialised by a lock file, so two operators
cannot interleave a switch and its record.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from semroute.errors import ConfigError, CorruptIndex, FingerprintMismatch, IndexNotFound
from semroute.index import CURRENT, MANIFEST, ExemplarIndex, read_manifest, switch_current

HISTORY = "promotions.jsonl"
_LOCK = ".promote.lock"


@dataclass(frozen=True)
class Promotion:
    """One line of ``ROOT/promotions.jsonl``: ``action`` promote or rollback, the version that
    serves after it and the one before it, when (ISO 8601 UTC), by whom, why."""

    action: str
    version: str
    previous: str
    at: str
    by: str
    reason: str


def default_actor() -> str:
    """``user@host`` of the process (what ``--by`` defaults to)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def serving_version(root: Path) -> str:
    """The version name ``ROOT/current`` points at ('' when there is no ``current``)."""
    link = Path(root) / CURRENT
    return link.resolve().name if link.is_symlink() or link.exists() else ""


def history(root: Path) -> list[Promotion]:
    """Every promotion and rollback of ``root``, oldest first (CorruptIndex names a bad line)."""
    file = Path(root) / HISTORY
    if not file.exists():
        return []
    out = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(Promotion(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as exc:
            raise CorruptIndex(f"{file}:{number}: not a promotion record ({exc}); the file is "
                               "append-only: repair that line by hand") from exc
    return out


def promoted_stack(entries: list[Promotion]) -> list[str]:
    """The versions promoted and not rolled back, oldest first (the top serves, normally)."""
    stack: list[str] = []
    for entry in entries:
        if entry.action == "promote":
            if not stack and entry.previous:
                stack.append(entry.previous)
            stack.append(entry.version)
        elif stack and stack[-1] == entry.previous:
            stack.pop()
    return stack


def promote(root: Path, version: str, *, reason: str, by: str | None = None) -> Promotion:
    """Make ``version`` (a name under ``ROOT/versions``, or a version directory elsewhere, which
    is copied in first) the one serving. Raises IndexNotFound (unknown version, listing those
    there are), CorruptIndex, FingerprintMismatch (another encoder than the version serving),
    ConfigError (it already serves)."""
    root = Path(root)
    with _locked(root):
        version_dir = _version_dir(root, version)
        return _switch(root, version_dir, "promote", reason, by)


def rollback(root: Path, *, reason: str, by: str | None = None) -> Promotion:
    """Switch back to the previously promoted version (see the module docstring). Raises
    ConfigError when there is nothing to roll back to, IndexNotFound when that version's
    directory is gone."""
    root = Path(root)
    with _locked(root):
        current = serving_version(root)
        stack = promoted_stack(history(root))
        if stack and stack[-1] == current:
            stack.pop()
        if not stack:
            raise ConfigError(
                f"{root}: nothing to roll back to ({HISTORY} records no earlier promoted version "
                f"than {current or 'none'}); promote a version by name instead"
            )
        return _switch(root, _version_dir(root, stack[-1]), "rollback", reason, by)


def _switch(root: Path, version_dir: Path, action: str, reason: str, by: str | None) -> Promotion:
    current = serving_version(root)
    if version_dir.name == current:
        raise ConfigError(f"{root}: version {current} already serves; nothing to {action}")
    _check(root, version_dir)
    switch_current(root, version_dir)
    entry = Promotion(action, version_dir.name, current,
                      datetime.now(UTC).isoformat(timespec="seconds"), by or default_actor(),
                      reason)
    line = json.dumps(asdict(entry), ensure_ascii=False) + "\n"
    # One write on an O_APPEND descriptor: lines from concurrent writers never interleave.
    fd = os.open(root / HISTORY, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return entry


def _check(root: Path, version_dir: Path) -> None:
    """Load the version in full; refuse another encoder than the one serving."""
    index = ExemplarIndex.load(version_dir)
    link = root / CURRENT
    if link.exists():
        serving = read_manifest(link.resolve()).encoder.fingerprint
        if index.encoder_fingerprint != serving:
            raise FingerprintMismatch(
                f"{version_dir}: built with encoder {index.encoder_fingerprint[:19]}… but "
                f"{root} serves {serving[:19]}…; a router would refuse it: rebuild it with the "
                "serving encoder"
            )


def version_dir(root: Path, version: str) -> Path:
    """Where VERSION is, as ``promote`` reads it, without copying anything: a name under
    ``ROOT/versions``, else a version directory elsewhere (symlinks resolved).
    Raises IndexNotFound as ``promote`` does."""
    named = Path(root) / "versions" / version
    if "/" not in version and (named / MANIFEST).exists():
        return named.resolve()
    given = Path(version)
    if (given / MANIFEST).exists():
        return given.resolve()
    return _version_dir(Path(root), version)  # raises, listing the versions there are


def _version_dir(root: Path, version: str) -> Path:
    versions = root / "versions"
    named = versions / version
    if "/" not in version and (named / MANIFEST).exists():
        return named
    given = Path(version)
    if (given / MANIFEST).exists():
        name = read_manifest(given).version
        inside = versions / name
        if inside.exists():
            if given.resolve() != inside.resolve() and read_manifest(inside).version != name:
                raise CorruptIndex(f"{inside}: exists but holds another version")
            return inside
        versions.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".promote-", dir=versions))
        try:
            shutil.copytree(given, tmp, dirs_exist_ok=True)
            tmp.chmod(0o755)
            tmp.rename(inside)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return inside
    known = sorted((p.name for p in versions.glob("*") if (p / MANIFEST).exists()),
                   reverse=True) if versions.exists() else []
    shown = ", ".join(known[:10]) + (f" and {len(known) - 10} more" if len(known) > 10 else "")
    raise IndexNotFound(
        f"{root}: no index version {version!r} (neither a name under {versions} nor a version "
        f"directory); versions there: {shown or 'none'}"
    )


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    if not root.is_dir():
        raise IndexNotFound(f"{root}: no such index root")
    fd = os.open(root / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
