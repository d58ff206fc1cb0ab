"""Learning inputs from feedback (no model: the hash encoder): logged queries with a score join
the serving index's exemplars, held-out feedback stays out, and what cannot be learnt is counted."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import pytest

from semroute.index import build_index
from semroute.loop.learn import LearnedRow, collect, in_holdout, prepare_learning, replay
from semroute.loop.records import DecisionRecord, Feedback, query_fields
from tests.conftest import HashEncoder, write


def _pair(i: int, text: str | None, route: str, target: str, score: float
          ) -> tuple[DecisionRecord, Feedback]:
    rid = f"req-{i}"
    fields = query_fields(text or "", keep_text=text is not None)
    decision = DecisionRecord(rid, 1000.0 + i, route, target, target, 0.9, False, "ok",
                              **fields)  # type: ignore[arg-type]
    return decision, Feedback(rid, score, ts=2000.0 + i)


def _read(path: Path) -> list[list[str]]:
    with path.open(newline="") as fh:
        return list(csv.reader(fh))


def _ids_not_held_out(n: int, share: float) -> list[int]:
    return [i for i in range(n) if not in_holdout(f"req-{i}", share)]


def test_outcome_feedback_becomes_rows_with_one_known_score(tmp_path: Path) -> None:
    """Each learnt query is a row with the served target's score and every other target blank;
    the serving exemplars are kept as they were."""
    csv_in = write(tmp_path / "o.csv", "text,cheap,strong\nadd two numbers,0.9,1\nprove it,0.1,0.8\n")
    version = build_index([csv_in], tmp_path / "idx", HashEncoder(), progress=False)
    pairs = [_pair(i, f"question {i}", "strong", "strong", 0.75) for i in range(20)]
    pairs.append(_pair(99, None, "cheap", "cheap", 1.0))  # text not logged
    learnt = prepare_learning(version, pairs, tmp_path / "work", holdout=0.25)
    rows = _read(learnt.exemplars_csv)
    assert rows[0] == ["text", "cheap", "strong"]
    assert rows[1:3] == [["add two numbers", "0.9", "1"], ["prove it", "0.1", "0.8"]]
    assert all(r[1] == "" and r[2] == "0.75" for r in rows[3:])
    assert len(rows) - 3 == len(learnt.train) and learnt.skipped_no_text == 1
    assert len(learnt.train) + len(learnt.holdout) == 20
    assert {r.request_id for r in learnt.train}.isdisjoint(r.request_id for r in learnt.holdout)
    assert sorted(int(r.request_id[4:]) for r in learnt.train) == [
        i for i in _ids_not_held_out(20, 0.25)
    ]
    # the candidate builds with the usual validation
    build_index([learnt.exemplars_csv], tmp_path / "cand", HashEncoder(), progress=False)


def test_labelled_feedback_keeps_well_rated_queries_only(tmp_path: Path) -> None:
    """A labelled index learns the queries whose answer scored well, under the route they were
    sent to; low scores are counted, not learnt."""
    csv_in = write(tmp_path / "l.csv", "text,label\nwrite code,code\nsolve x,math\n")
    version = build_index([csv_in], tmp_path / "idx", HashEncoder(), progress=False)
    pairs = [_pair(i, f"q {i}", "code", "code", 1.0 if i % 2 else 0.0) for i in range(10)]
    learnt = prepare_learning(version, pairs, tmp_path / "work", holdout=0.0)
    rows = _read(learnt.exemplars_csv)[1:]
    assert [r[:2] for r in rows[:2]] == [["write code", "code"], ["solve x", "math"]]
    assert sorted(r[0] for r in rows[2:]) == sorted(f"q {i}" for i in range(1, 10, 2))
    assert learnt.skipped_low_score == 5
    assert learnt.provenance()["learned_rows"] == 5


def test_the_holdout_split_is_stable() -> None:
    """The same id lands on the same side every time; about the share asked lands in it."""
    first = [in_holdout(f"id-{i}", 0.2) for i in range(2000)]
    assert first == [in_holdout(f"id-{i}", 0.2) for i in range(2000)]
    assert 0.15 < sum(first) / 2000 < 0.25


def test_rows_carry_the_logged_propensity_of_the_target_served_first() -> None:
    """A feedback row takes its decision's propensity when its target is the one served first;
    a row answered by a fallback (not a choice anyone drew) counts as certain."""
    decision, fb = _pair(1, "q", "code", "b", 0.5)
    served = replace(decision, propensity=0.2)
    fallback = replace(decision, request_id="req-2", decided_target="a", propensity=0.2)
    train, _, _ = collect([(served, fb), (fallback, replace(fb, request_id="req-2"))], 0.0)
    assert [(r.request_id, r.propensity) for r in train] == [("req-1", 0.2), ("req-2", 1.0)]


def test_replay_weighs_matched_rows_by_their_inverse_propensity() -> None:
    """The weighted replay score counts a row served against the odds for the queries it stands
    for; with every propensity 1 it equals the plain mean of the matched rows."""
    rows = [LearnedRow("r1", "x", "code", "a", 1.0, 1.0, propensity=0.1),
            LearnedRow("r2", "y", "code", "a", 0.0, 2.0, propensity=0.9),
            LearnedRow("r3", "z", "code", "b", 1.0, 3.0, propensity=0.9)]
    got = replay(lambda text: "a", rows)
    assert (got.matched, got.rows, got.mean_score) == (2, 3, 0.5)
    assert got.weighted_score == pytest.approx(10 / (10 + 1 / 0.9))
    certain = [replace(r, propensity=1.0) for r in rows]
    assert replay(lambda text: "a", certain).weighted_score == pytest.approx(0.5)
    assert replay(lambda text: "c", rows).as_dict()["weighted_score"] is None
