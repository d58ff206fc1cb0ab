"""The in-process Router with the real encoder: default routes, explain, history, policy, CLI,
and small real-data runs (Banking77 labels, LLMRouter outcomes)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from semroute.errors import InvalidRequest, UnknownTarget
from semroute.types import Policy, Query
from tests.conftest import run_cli

EXPECTED = [
    ("Write a Python function that merges two sorted lists", "code"),
    ("why does my rust borrow checker complain about this closure", "code"),
    ("Solve for x: 3x + 7 = 22", "math"),
    ("what is the probability of rolling two sixes with two dice", "math"),
    ("Write a short poem about the sea at night", "creative"),
    ("Give me a TL;DR of this article about interest rates", "summarize"),
    ("hey, how's your day going?", "chitchat"),
    ("Here is my patient's chart with her HIV test results, please draft a letter", "sensitive"),
]


@pytest.mark.parametrize(("text", "route"), EXPECTED)
def test_default_index_routes_typical_queries(default_router, text: str, route: str) -> None:  # type: ignore[no-untyped-def]
    """The shipped starter routes send typical queries of each kind to the right route."""
    decision = default_router.route(text)
    assert decision.route == route, decision.reason
    assert decision.target == decision.targets[0]


def test_sensitive_route_only_has_local_targets(default_router) -> None:  # type: ignore[no-untyped-def]
    """Sensitive data never gets a cloud target in its chain, even without require_local."""
    d = default_router.route("our employee's salary and social security number are attached")
    table = default_router.index.route_table
    assert d.route == "sensitive"
    assert all(table.targets[t].local for t in d.targets)


def test_off_topic_query_falls_back_to_default(default_router) -> None:  # type: ignore[no-untyped-def]
    """Something no route covers gets low confidence and the default route, flagged."""
    d = default_router.route("zxqv lorem ipsum 7734 qqq")
    assert d.fallback and d.route == "general"
    assert "below its threshold" in d.reason


def test_explain_returns_nearest_exemplars(default_router) -> None:  # type: ignore[no-untyped-def]
    """explain=True lists neighbours with similarity, most similar first; off by default."""
    d = default_router.route("Write a haiku about spring rain", explain=True)
    assert 1 <= len(d.neighbors) <= 5
    sims = [n.similarity for n in d.neighbors]
    assert sims == sorted(sims, reverse=True)
    assert d.neighbors[0].label == "creative"
    assert default_router.route("Write a haiku about spring rain").neighbors == ()


def test_history_steers_an_ambiguous_follow_up(default_router) -> None:  # type: ignore[no-untyped-def]
    """A vague follow-up routes with the conversation, not on its own words alone."""
    follow_up = "can you make it shorter and handle the empty case?"
    code_history = ("Write a Python function that parses ISO dates from a log file",)
    poem_history = ("Write a long poem about autumn and the empty fields",)
    with_code = default_router.route(follow_up, history=code_history)
    with_poem = default_router.route(follow_up, history=poem_history)
    assert with_code.route == "code"
    assert with_poem.route == "creative"


def test_require_local_policy_changes_target(default_router) -> None:  # type: ignore[no-untyped-def]
    """allowed_targets and require_local reshape the chain of the same route."""
    text = "Write a Python function that merges two sorted lists"
    only_cloud = default_router.route(text, policy=Policy(allowed_targets=("gpt-4o",)))
    assert only_cloud.target == "gpt-4o"
    local = default_router.route(text, policy=Policy(require_local=True))
    assert "gpt-4o" not in local.targets


@pytest.mark.parametrize(
    ("query", "field"),
    [
        (Query("   "), "query"),
        (Query("x" * 9000), "query"),
        (Query("hi", policy=Policy(allowed_targets=("nope",))), "policy.allowed_targets[0]"),
        (Query("hi", policy=Policy(quality_tolerance=2.0)), "policy.quality_tolerance"),
        (Query("hi", history=("x" * 9000,)), "history[0]"),
    ],
)
def test_bad_queries_name_the_field(default_router, query: Query, field: str) -> None:  # type: ignore[no-untyped-def]
    """Each invalid request raises InvalidRequest whose field is the proto field name."""
    with pytest.raises(InvalidRequest) as info:
        default_router.route_batch([query])
    assert info.value.field == field
    if field.startswith("policy.allowed"):
        assert isinstance(info.value, UnknownTarget)


def test_batch_equals_one_by_one(default_router) -> None:  # type: ignore[no-untyped-def]
    """route_batch gives each query the same decision route() gives it alone."""
    texts = [t for t, _ in EXPECTED]
    batch = default_router.route_batch([Query(t) for t in texts])
    single = [default_router.route(t) for t in texts]
    assert [(d.route, d.target) for d in batch] == [(d.route, d.target) for d in single]
    for a, b in zip(batch, single, strict=True):
        assert a.confidence == pytest.approx(b.confidence, abs=1e-4)


def test_cli_routes_stdin_lines_as_json(default_index: Path) -> None:
    """`semroute route --json` with queries on stdin prints one decision per line, in order."""
    out = run_cli(
        "route", "--index", str(default_index), "--json", stdin="Solve 2x = 10\n\nhello there!\n"
    )
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["route"] for r in rows] == ["math", "chitchat"]
    assert {"route", "target", "confidence", "fallback", "reason"} <= set(rows[0])


def test_cli_build_error_lists_rows_and_exits_nonzero(tmp_path: Path, encoder_dir: Path) -> None:
    """A bad exemplar file makes `index build` exit 2 with file:line messages and no index."""
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nfine,a\n,a\nalso fine,\n")
    out = run_cli(
        "index", "build", "--exemplars", str(bad), "--encoder", str(encoder_dir),
        "--out", str(tmp_path / "idx"), check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert f"{bad}:3: empty text" in out.stderr and f"{bad}:4: empty label" in out.stderr
    assert not (tmp_path / "idx" / "current").exists()


def _subset(src: Path, dst: Path, rows: int, step: int = 1) -> Path:
    with (
        src.open(newline="", encoding="utf-8") as fin,
        dst.open("w", newline="", encoding="utf-8") as fout,
    ):
        reader = csv.reader(fin)
        writer = csv.writer(fout)
        writer.writerow(next(reader))
        for i, row in enumerate(reader):
            if i % step == 0:
                writer.writerow(row)
                rows -= 1
                if rows == 0:
                    break
    return dst


def test_banking77_subset_routes_well(tmp_path: Path, shared_data: Path, onnx_encoder) -> None:  # type: ignore[no-untyped-def]
    """On a Banking77 slice (every 2nd train row, every 10th test row) the kNN vote is accurate.

    The full figure (>= 0.92) is published by scripts/evaluate.py; this is its fast guard.
    """
    from semroute.index import build_index
    from semroute.router import Router

    # train.csv is grouped by label: take every other row so every intent is present.
    train = _subset(shared_data / "banking77" / "train.csv", tmp_path / "train.csv", 5002, step=2)
    build_index([train], tmp_path / "idx", onnx_encoder, progress=False)
    router = Router.load(tmp_path / "idx", encoder_path=onnx_encoder.path)
    with (shared_data / "banking77" / "test.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[::10][:300]
    decisions = router.route_batch([Query(r["text"]) for r in rows])
    accuracy = sum(d.route == r["label"] for d, r in zip(decisions, rows, strict=True)) / len(rows)
    assert accuracy >= 0.85, accuracy


def test_llmrouter_outcomes_estimate_every_target(
    tmp_path: Path, shared_data: Path, onnx_encoder
) -> None:  # type: ignore[no-untyped-def]
    """An outcome index built from LLMRouter scores predicts quality for all 9 models and honours
    a cost ceiling from models.csv."""
    from semroute.index import build_index
    from semroute.router import Router

    src = shared_data / "llmrouter"
    train = _subset(src / "train.csv", tmp_path / "train.csv", 400, step=7)
    build_index(
        [train], tmp_path / "idx", onnx_encoder, targets_file=src / "models.csv", progress=False
    )
    router = Router.load(tmp_path / "idx", encoder_path=onnx_encoder.path)
    d = router.route("Q: What is the capital of Australia? A:")
    assert len(d.scores) == 9 and all(0.0 <= v <= 1.0 for v in d.scores.values())
    cheap = router.route("Q: What is the capital of Australia? A:", policy=Policy(max_cost=0.15))
    assert router.index.route_table.targets[cheap.target].cost <= 0.15


_TOPICS = {
    "cooking": [
        "how long should I roast a whole chicken", "best way to caramelize onions",
        "can I substitute butter with olive oil in cookies", "how do I make fresh pasta dough",
        "what temperature to bake sourdough bread", "how to keep rice from getting sticky",
        "recipe for a quick tomato sauce", "how do I sear a steak in a cast iron pan",
        "how much salt goes in pizza dough", "why did my souffle collapse in the oven",
        "how to poach an egg without it falling apart", "what spices go well in a lentil curry",
    ],
    "programming": [
        "how do I reverse a list in python", "what does a segmentation fault mean in C",
        "how to write a unit test with pytest", "git says my branch has diverged, what now",
        "explain async and await in javascript", "why is my SQL join returning duplicate rows",
        "how to read a csv file with pandas", "what is a race condition between threads",
        "how do I fix a null pointer exception in java", "compile a rust project in release mode",
        "how to profile a slow python function", "what is the difference between a list and a tuple",
    ],
    "weather": [
        "will it rain tomorrow in london", "what is the forecast for this weekend",
        "how cold will it get tonight", "is there a storm warning for the coast",
        "what is the humidity today", "when will the heatwave end",
        "is it going to snow on friday", "how strong is the wind this afternoon",
        "what's the uv index at noon", "will there be fog in the morning",
        "chance of thunderstorms this evening", "what is the temperature right now outside",
    ],
}


def test_off_topic_query_falls_back_after_calibration_without_routes_file(
    tmp_path: Path, onnx_encoder  # type: ignore[no-untyped-def]
) -> None:
    """A plain `text,label` index (no routes file), calibrated for 90% in-scope coverage on a
    validation set with `oos` rows, sends an off-topic query to the `default` route with
    fallback=true and says why, while a clear in-scope query is still answered."""
    from semroute.index import build_index
    from semroute.quality.calibrate import calibrate_router
    from semroute.router import Router

    rows = [f'"{t}",{label}' for label, texts in _TOPICS.items() for t in texts]
    exemplars = tmp_path / "ex.csv"
    exemplars.write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    val = tmp_path / "val.csv"
    val.write_text(
        "text,label\n"
        "how do I whisk egg whites into stiff peaks,cooking\n"
        "what oil is best for deep frying,cooking\n"
        "how to merge two dictionaries in python,programming\n"
        "what is a memory leak,programming\n"
        "will it be sunny on sunday,weather\n"
        "how much rain fell last night,weather\n"
        "who won the football world cup in 2014,oos\n"
        "how many moons does jupiter have,oos\n"
        "what is the capital city of mongolia,oos\n",
        encoding="utf-8",
    )
    build_index([exemplars], tmp_path / "idx", onnx_encoder, progress=False)
    router = Router.load(tmp_path / "idx", encoder_path=onnx_encoder.path)
    calibrate_router(router, val, in_scope_coverage=0.9)
    router = Router.load(tmp_path / "idx", encoder_path=onnx_encoder.path)
    threshold = router.index.route_table.threshold
    assert threshold is not None

    off = router.route("recommend a good novel about medieval knights")
    assert off.fallback and off.route == "default" and off.target == "default"
    assert "below its threshold" in off.reason
    on = router.route("how do I debug a python script that crashes with a KeyError")
    assert not on.fallback and on.route == "programming"
