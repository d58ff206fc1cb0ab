"""`semroute drift` on a real decision log (SQLite and a real PostgreSQL server), with the
real encoder clustering the fell-back queries and real PNGs written."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from semroute.loop.decision_log import DecisionLog
from semroute.loop.drift_report import build_report
from semroute.loop.records import DecisionRecord, Feedback, ShadowRecord, query_fields
from semroute.loop.store import open_store
from tests.conftest import run_cli
from tests.integration.router_grpc_support import shared_encoder, small_index
from tests.integration.test_decision_log import postgres, store_url

__all__ = ["postgres", "small_index", "store_url"]

pytestmark = pytest.mark.integration

WEATHER = ["What is the weather in Paris tomorrow?", "Weather forecast for Paris tomorrow",
           "Will it rain in Paris tomorrow?", "Tomorrow's weather in Paris, please"]
FLIGHTS = ["Book me a flight to Rome on Friday", "I need a plane ticket to Rome this Friday",
           "Find flights to Rome for Friday", "Reserve a flight to Rome, Friday morning"]


def _fill(url: str) -> None:
    """Window 1 (t=T+0..99): 80 code, 20 math on v1. Window 2 (t=T+1000..1099): 20 code,
    60 math on v2, 20 fell back (the weather and flight queries, with text, among them).
    T is an hour ago (older rows would be purged by the retention)."""
    base = time.time() - 3600
    log = DecisionLog(open_store(url))
    plan = [("code", False, "v1")] * 80 + [("math", False, "v1")] * 20
    plan += [("code", False, "v2")] * 20 + [("math", False, "v2")] * 60
    plan += [("chitchat", True, "v2")] * 20
    odd = iter([*WEATHER, *FLIGHTS, *(f"unrelated filler {i} zebra" for i in range(12))])
    for i, (route, fallback, version) in enumerate(plan):
        ts = base + (i if i < 100 else 1000 + (i - 100))
        text = next(odd) if fallback else f"query {i}"
        log.record(DecisionRecord(
            f"r{i}", float(ts), route, "t", "t", 0.2 if fallback else 0.9, fallback, "ok",
            index_version=version, cost_usd=0.01,
            **query_fields(text, keep_text=fallback),  # type: ignore[arg-type]
        ))
    assert log.flush()
    for i in (0, 1, 150):
        log.feedback(Feedback(f"r{i}", 1.0 if i < 100 else 0.5, ts=base + 2000))
    log.record_shadow(ShadowRecord("r150", base + 1050, "v2", "v3", "math", "t", 0.9, False,
                                   "code", "t", 0.8, False))
    assert log.flush()
    log.close()


def test_report_on_both_stores(store_url: str) -> None:
    """Routes that moved, fallback share per window, per-version feedback and cost, shadow
    differences, and the fell-back queries clustered by theme."""
    _fill(store_url)
    store = open_store(store_url)
    try:
        report = build_report(store, windows=2, exemplar_mix={"code": 1, "math": 1},
                              embed=shared_encoder().encode, cluster_threshold=0.5)
    finally:
        store.close()
    w1, w2 = report["windows"]
    assert (w1["requests"], w2["requests"]) == (100, 100)
    assert (w1["fallback_share"], w2["fallback_share"]) == (0.0, 0.2)
    assert w2["divergence"] > w1["divergence"]
    changes = {c["route"]: c["change"] for c in report["route_changes"]}
    assert changes == {"math": 0.4, "chitchat": 0.2, "code": -0.6}
    versions = {v["version"]: v for v in report["versions"]}
    assert versions["v1"]["feedback"] == 2 and versions["v1"]["mean_score"] == 1.0
    assert versions["v2"]["mean_score"] == 0.5 and versions["v2"]["fallback_share"] == 0.2
    assert versions["v2"]["cost_usd"] == pytest.approx(1.0)
    assert report["shadow_differences"] == [{"serving": "v2", "candidate": "v3", "logged": 1}]
    clusters = report["fallback_queries"]["clusters"]
    groups = [set(c["examples"]) for c in clusters]
    assert any(len(g) >= 3 and g <= set(WEATHER) for g in groups)
    assert any(len(g) >= 3 and g <= set(FLIGHTS) for g in groups)
    assert not any(g & set(WEATHER) and g & set(FLIGHTS) for g in groups)


def test_drift_command_writes_json_markdown_and_pngs(tmp_path: Path, small_index: Path) -> None:
    """The command reads the log, takes the exemplar mix from --index and writes the report;
    an empty log is a clear error."""
    url = f"sqlite:{tmp_path / 'log.db'}"
    _fill(url)
    out = tmp_path / "report"
    run_cli("drift", "--log", url, "--index", str(small_index), "--out", str(out))
    report = json.loads((out / "drift.json").read_text())
    assert set(report["exemplar_mix"]) >= {"code", "math", "chitchat"}
    assert "math" in (out / "drift.md").read_text()
    for name in ("route_mix.png", "confidence.png", "fallback_share.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = run_cli("drift", "--log", f"sqlite:{tmp_path / 'none.db'}", "--out", str(out),
                    check=False)
    assert empty.returncode == 2 and "no logged decision" in empty.stderr
