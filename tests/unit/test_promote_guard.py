"""The promotion guard: `semroute index promote --if-better` promotes a `learn` candidate only
when the held-out replay recorded beside it prefers it to the version it was learnt from
(`semroute.loop.learn.ReplayVerdict`). A deterministic hash encoder: no model needed; the real
command runs in a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from semroute.errors import ConfigError
from semroute.index import build_index, switch_current
from semroute.loop.learn import ReplayScore, ReplayVerdict, read_verdict, replay_record
from semroute.loop.promote import HISTORY, history, serving_version
from tests.conftest import HashEncoder, run_cli, write

CSV = "text,label\nreverse a list in python,code\nhello friend,chat\nhi there friend,chat\n"


def _verdict(serving: float | None, candidate: float | None, matched: int = 40) -> ReplayVerdict:
    return ReplayVerdict(ReplayScore(100, 100, serving, serving),
                         ReplayScore(matched if candidate is not None else 0, 100, candidate,
                                     candidate))


def test_the_verdict_prefers_a_candidate_only_on_a_strictly_higher_replay() -> None:
    """Higher weighted replay score: preferred; equal or lower: not; a side that matched no
    held-out row gives no evidence, so the serving version stays."""
    assert _verdict(0.60, 0.65).prefers_candidate
    assert not _verdict(0.60, 0.60).prefers_candidate
    assert not _verdict(0.60, 0.55).prefers_candidate
    assert not _verdict(0.60, None).prefers_candidate
    assert not _verdict(None, 0.65).prefers_candidate
    # as recorded by `learn` and read back by `promote --if-better`
    again = ReplayScore.from_dict(_verdict(0.6, 0.65).candidate.as_dict())
    assert again == _verdict(0.6, 0.65).candidate


def _setup(tmp_path: Path, enc: HashEncoder, verdict: ReplayVerdict) -> tuple[Path, Path, Path]:
    """A serving root with one version and a `learn`-style candidate root beside it whose
    record holds ``verdict``."""
    root = tmp_path / "idx"
    serving = build_index([write(tmp_path / "a.csv", CSV)], root, enc, progress=False,
                          tune=False)
    candidate = build_index([write(tmp_path / "b.csv", CSV + "add a test,code\n")],
                            tmp_path / "cand", enc, progress=False, tune=False)
    replay_record(candidate).write_text(json.dumps(
        {"serving_version": serving.name, "holdout_replay": verdict.as_dict()}))
    switch_current(root, serving)
    return root, serving, candidate


def test_a_candidate_the_replay_does_not_prefer_is_not_promoted(
    tmp_path: Path, hash_encoder: HashEncoder
) -> None:
    """--if-better with a lower held-out replay: exit 1 saying both figures, `current` and the
    promotion history untouched."""
    root, serving, candidate = _setup(tmp_path, hash_encoder, _verdict(0.61, 0.58))
    out = run_cli("index", "promote", str(root), str(candidate), "--reason", "weekly learn",
                  "--if-better", check=False)
    assert out.returncode == 1
    assert "not promoted" in out.stdout and "serving 0.61, candidate 0.58" in out.stdout
    assert serving_version(root) == serving.name
    assert not (root / HISTORY).exists()


def test_a_candidate_the_replay_prefers_is_promoted_with_its_figures(
    tmp_path: Path, hash_encoder: HashEncoder
) -> None:
    """--if-better with a higher held-out replay: promoted (through the `current` link of the
    candidate root, as `learn --out` leaves it), the replay figures in the recorded reason."""
    root, _, candidate = _setup(tmp_path, hash_encoder, _verdict(0.58, 0.61))
    run_cli("index", "promote", str(root), str(tmp_path / "cand" / "current"),
            "--reason", "weekly learn", "--if-better")
    assert serving_version(root) == candidate.name
    (entry,) = history(root)
    assert entry.reason.startswith("weekly learn [held-out replay: serving 0.58, candidate 0.61")


def test_a_version_without_a_recorded_replay_is_refused_with_where_it_looked(
    tmp_path: Path, hash_encoder: HashEncoder
) -> None:
    """A version `learn` did not make has no replay: --if-better exits 2 naming the file it
    looked for; without the flag the same version promotes."""
    root, _, candidate = _setup(tmp_path, hash_encoder, _verdict(0.58, 0.61))
    replay_record(candidate).unlink()
    with pytest.raises(ConfigError, match=f"learned-{candidate.name}.json"):
        read_verdict(candidate)
    out = run_cli("index", "promote", str(root), str(candidate), "--reason", "x",
                  "--if-better", check=False)
    assert out.returncode == 2 and f"learned-{candidate.name}.json" in out.stderr
    assert serving_version(root) != candidate.name
    run_cli("index", "promote", str(root), str(candidate), "--reason", "by hand")
    assert serving_version(root) == candidate.name


def test_a_replay_against_another_version_than_the_one_serving_is_not_acted_on(
    tmp_path: Path, hash_encoder: HashEncoder
) -> None:
    """The replay preferred the candidate to the version `learn` ran against, but the root has
    moved on to another version since: --if-better exits 1 naming both, nothing switches."""
    root, serving, candidate = _setup(tmp_path, hash_encoder, _verdict(0.58, 0.61))
    assert read_verdict(candidate).against == serving.name
    newer = build_index([write(tmp_path / "c.csv", CSV + "hey,chat\n")], root, hash_encoder,
                        progress=False, tune=False)
    assert serving_version(root) == newer.name
    out = run_cli("index", "promote", str(root), str(candidate), "--reason", "weekly learn",
                  "--if-better", check=False)
    assert out.returncode == 1
    assert f"compared the candidate with {serving.name}" in out.stdout and newer.name in out.stdout
    assert serving_version(root) == newer.name
