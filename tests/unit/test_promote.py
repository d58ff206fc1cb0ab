"""Promotion and rollback of index versions (semroute.loop.promote): the atomic `current`
switch under a concurrent reader, the append-only record, rollback to the previously promoted
version, and clear errors. A deterministic hash encoder: no model needed."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
from pathlib import Path

import pytest

from semroute.errors import ConfigError, CorruptIndex, FingerprintMismatch, IndexNotFound
from semroute.index import build_index, read_manifest, resolve_version_dir, switch_current
from semroute.loop.promote import HISTORY, history, promote, rollback, serving_version
from tests.conftest import HashEncoder, write

CSV = (
    "text,label\nreverse a list in python,code\nfix this python bug,code\n"
    "hello friend,chat\nhi there friend,chat\n"
)


def _versions(tmp_path: Path, enc: HashEncoder, n: int, root: Path | None = None) -> list[Path]:
    """``n`` versions under one root (each build switches `current` to itself)."""
    root = root or tmp_path / "idx"
    out = []
    for i in range(n):
        f = write(tmp_path / f"ex{i}.csv", CSV + f"extra row number {i},chat\n")
        out.append(build_index([f], root, enc, progress=False, tune=False))
    return out


def test_promote_switches_current_and_records_who_when_why(
    tmp_path: Path, hash_encoder: HashEncoder
) -> None:
    """promote makes the named version serve and appends one line saying what, from what,
    when, by whom and why."""
    v1, v2 = _versions(tmp_path, hash_encoder, 2)
    root = tmp_path / "idx"
    switch_current(root, v1)
    entry = promote(root, v2.name, reason="better on held-out feedback", by="ana")
    assert serving_version(root) == v2.name == entry.version
    assert (entry.action, entry.previous, entry.by) == ("promote", v1.name, "ana")
    lines = (root / HISTORY).read_text().splitlines()
    assert [json.loads(x)["reason"] for x in lines] == ["better on held-out feedback"]
    assert json.loads(lines[0])["at"].endswith("+00:00")
    assert history(root) == [entry]


def test_rollback_goes_to_the_previously_promoted_version(
    tmp_path: Path, hash_encoder: HashEncoder
) -> None:
    """promote v2, promote v3, rollback -> v2, rollback -> v1 (where promotions started),
    then nothing is left to roll back to; a promotion after a rollback stacks again."""
    v1, v2, v3 = _versions(tmp_path, hash_encoder, 3)
    root = tmp_path / "idx"
    switch_current(root, v1)
    promote(root, v2.name, reason="r2")
    promote(root, v3.name, reason="r3")
    assert rollback(root, reason="v3 worse").version == v2.name
    assert serving_version(root) == v2.name
    assert rollback(root, reason="v2 worse too").previous == v2.name
    assert serving_version(root) == v1.name
    with pytest.raises(ConfigError, match="nothing to roll back to"):
        rollback(root, reason="again")
    promote(root, v3.name, reason="retry")
    assert rollback(root, reason="no").version == v1.name
    assert [e.action for e in history(root)] == [
        "promote", "promote", "rollback", "rollback", "promote", "rollback"]


def test_rollback_after_a_build_returns_to_the_last_promoted_version(
    tmp_path: Path, hash_encoder: HashEncoder
) -> None:
    """A build moves `current` outside promotions; rollback then goes back to the version
    last promoted, and the next one to the version before it."""
    v1, v2 = _versions(tmp_path, hash_encoder, 2)
    root = tmp_path / "idx"
    switch_current(root, v1)
    promote(root, v2.name, reason="r")
    (v3,) = _versions(tmp_path / "more", hash_encoder, 1, root=root)
    assert serving_version(root) == v3.name
    assert rollback(root, reason="unreviewed build").version == v2.name
    assert rollback(root, reason="and back").version == v1.name


def test_unknown_version_and_bad_requests_are_clear_errors(
    tmp_path: Path, hash_encoder: HashEncoder
) -> None:
    """An unknown version lists those there are; the version already serving, another
    encoder's version and a missing root are refused; nothing is recorded for any of them."""
    v1, v2 = _versions(tmp_path, hash_encoder, 2)
    root = tmp_path / "idx"
    with pytest.raises(IndexNotFound) as exc:
        promote(root, "20990101T000000000000Z-deadbeef", reason="r")
    assert v1.name in str(exc.value) and v2.name in str(exc.value)
    with pytest.raises(ConfigError, match="already serves"):
        promote(root, v2.name, reason="r")
    other_enc = HashEncoder(fingerprint="sha256:another-encoder")
    (foreign,) = _versions(tmp_path / "o", other_enc, 1, root=tmp_path / "other")
    with pytest.raises(FingerprintMismatch, match="serving encoder"):
        promote(root, str(foreign), reason="r")
    with pytest.raises(IndexNotFound, match="no such index root"):
        promote(tmp_path / "nope", v1.name, reason="r")
    with pytest.raises(ConfigError, match="nothing to roll back to"):
        rollback(root, reason="r")
    assert not (root / HISTORY).exists() and serving_version(root) == v2.name


def test_a_version_from_another_root_is_copied_in_then_promoted(
    tmp_path: Path, hash_encoder: HashEncoder
) -> None:
    """`learn --out DIR2` builds elsewhere: promoting DIR2/current copies that version under
    ROOT/versions (checked in full there) and switches to the copy."""
    _versions(tmp_path, hash_encoder, 1)
    (cand,) = _versions(tmp_path / "c", hash_encoder, 1, root=tmp_path / "candidates")
    root = tmp_path / "idx"
    entry = promote(root, str(tmp_path / "candidates" / "current"), reason="learned")
    assert entry.version == cand.name and (root / "versions" / cand.name).is_dir()
    assert resolve_version_dir(root) == (root / "versions" / cand.name).resolve()
    assert read_manifest(resolve_version_dir(root)).version == cand.name
    assert not list((root / "versions").glob(".promote-*"))


def test_a_corrupt_version_is_refused_before_the_switch(
    tmp_path: Path, hash_encoder: HashEncoder
) -> None:
    """A version whose files fail their checksums is refused; `current` stays."""
    v1, v2 = _versions(tmp_path, hash_encoder, 2)
    root = tmp_path / "idx"
    switch_current(root, v1)
    (v2 / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(CorruptIndex):
        promote(root, v2.name, reason="r")
    assert serving_version(root) == v1.name


def test_a_concurrent_reader_never_sees_a_half_switched_current(
    tmp_path: Path, hash_encoder: HashEncoder
) -> None:
    """While two threads promote and roll back 60 times, a reader resolving `current` and
    reading its manifest always finds a whole version (one of the two); the record ends with
    one line per switch and the last line names the version serving."""
    v1, v2 = _versions(tmp_path, hash_encoder, 2)
    root = tmp_path / "idx"
    switch_current(root, v1)
    names = {v1.name, v2.name}
    done = threading.Event()
    seen: list[str] = []
    problems: list[str] = []

    def reader() -> None:
        while not done.is_set():
            try:
                seen.append(read_manifest(resolve_version_dir(root)).version)
                link = os.readlink(root / "current")
                if Path(link).name not in names:
                    problems.append(link)
            except Exception as exc:  # any failure is the half state this test looks for
                problems.append(repr(exc))

    def flipper(first: Path, second: Path) -> None:
        for _ in range(30):
            for v in (first, second):
                # ConfigError: the other thread got there first, it already serves
                with contextlib.suppress(ConfigError):
                    promote(root, v.name, reason="flip")

    threads = [threading.Thread(target=reader), threading.Thread(target=flipper, args=(v2, v1)),
               threading.Thread(target=flipper, args=(v1, v2))]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    done.set()
    threads[0].join()
    assert problems == [] and set(seen) <= names and len(seen) > 0
    entries = history(root)
    assert len(entries) == len((root / HISTORY).read_text().splitlines()) > 0
    assert entries[-1].version == serving_version(root)
    for before, after in itertools.pairwise(entries):
        assert after.previous == before.version  # serialised: each starts where the last ended
