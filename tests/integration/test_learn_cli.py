"""`semroute learn` end to end on the real encoder: decisions and feedback in a SQLite log become
a candidate outcome index next to the serving one, with provenance and a held-out replay that
`index promote --if-better` reads back."""

from __future__ import annotations

import json
import time
from pathlib import Path

from semroute.loop.decision_log import DecisionLog
from semroute.loop.records import DecisionRecord, Feedback, query_fields
from semroute.loop.store import open_store
from tests.conftest import run_cli, write

SERVING = """text,cheap,strong
What is 2 + 2?,1,1
Add 17 and 25.,1,1
Prove that there are infinitely many primes.,0,1
Derive the closed form of the Fibonacci sequence.,0,1
"""


def test_learn_builds_a_candidate_from_feedback(tmp_path: Path, encoder_dir: Path) -> None:
    """Feedback rows with logged text join the candidate; rows without text are counted; the
    summary says where the candidate is and how both versions replay on held-out feedback."""
    csv_in = write(tmp_path / "o.csv", SERVING)
    run_cli("index", "build", "--exemplars", str(csv_in), "--encoder", str(encoder_dir),
            "--out", str(tmp_path / "serving"), "--no-tune")
    db = tmp_path / "log.db"
    log = DecisionLog(open_store(f"sqlite:{db}"))
    now = time.time()
    for i in range(30):
        text = f"Multiply {i} by {i + 3}." if i % 2 else f"Prove lemma number {i} by induction."
        target = "cheap" if i % 2 else "strong"
        log.record(DecisionRecord(f"r{i}", now - 100 + i, target, target, target, 0.8, False,
                                  "ok", **query_fields(text, keep_text=i != 0)))  # type: ignore[arg-type]
        log.feedback(Feedback(f"r{i}", 1.0 if i % 2 else 0.9, ts=now))
    log.close()
    out = run_cli("learn", "--log", f"sqlite:{db}", "--index", str(tmp_path / "serving"),
                  "--out", str(tmp_path / "cand"), "--json")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(summary["candidate"]).is_dir()
    assert (tmp_path / "cand" / "current").exists()
    assert summary["skipped_no_text"] == 1
    assert summary["learned_rows"] + summary["holdout_rows"] == 29
    assert summary["holdout_replay"]["candidate"]["rows"] == summary["holdout_rows"]
    provenance = json.loads(
        (tmp_path / "cand" / f"learned-{Path(summary['candidate']).name}.json").read_text()
    )
    assert provenance["time_range"][0] >= now - 100
    # the replay is recorded beside the candidate, and `promote --if-better` acts on it
    verdict = summary["holdout_replay"]
    assert provenance["holdout_replay"] == verdict
    assert isinstance(verdict["prefers_candidate"], bool)
    promoted = run_cli("index", "promote", str(tmp_path / "serving"), summary["candidate"],
                       "--reason", "learnt", "--if-better", check=False)
    assert promoted.returncode == (0 if verdict["prefers_candidate"] else 1), promoted.stderr
    serving_now = (tmp_path / "serving" / "current").resolve().name
    assert (serving_now == Path(summary["candidate"]).name) is verdict["prefers_candidate"]
