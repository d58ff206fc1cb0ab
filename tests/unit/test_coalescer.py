"""The router server's coalescer, with a scripted batch runner (no model): a lone query runs at
once, concurrent ones share a batch, one caller's error stays its own, a closed coalescer
answers NotReady, and callers that left are dropped before the encoder."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from semroute.errors import NotReady
from semroute.grpc.coalescer import Coalescer
from semroute.types import Decision, Query

ROUTER: Any = object()  # grouped by identity only


def _decision(text: str) -> Decision:
    return Decision(text, text, 1.0, False, "scripted", {}, (text,))


class Runner:
    """Records each batch; batches wait on ``gate`` when it is set up (to hold the service
    busy); a query text starting with "bad" fails the batch it is in."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()

    async def __call__(self, router: Any, queries: list[Query]) -> list[Decision]:
        self.batches.append([q.text for q in queries])
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if any(q.text.startswith("bad") for q in queries):
            raise ValueError("scripted failure")
        return [_decision(q.text) for q in queries]


async def _coalescer(runner: Runner, **kwargs: Any) -> Coalescer:
    settings = {"max_batch": 8, "max_wait_s": 0.0, "slots": 1, **kwargs}
    coalescer = Coalescer(runner, **settings)
    coalescer.start()
    return coalescer


async def test_a_lone_query_runs_at_once_in_a_batch_of_one() -> None:
    """On an idle service the query is its own batch and gets its own decision."""
    runner = Runner()
    coalescer = await _coalescer(runner)
    try:
        decision = await coalescer.submit(ROUTER, Query("alone"))
    finally:
        await coalescer.close()
    assert decision.route == "alone"
    assert runner.batches == [["alone"]]


async def test_queries_arriving_while_busy_share_one_batch() -> None:
    """While a batch runs, later queries queue and go to the encoder together (up to
    max_batch), each caller getting the decision for its own query."""
    runner = Runner()
    runner.gate = asyncio.Event()
    coalescer = await _coalescer(runner, max_batch=4)
    try:
        first = asyncio.create_task(coalescer.submit(ROUTER, Query("first")))
        await runner.started.wait()
        rest = [asyncio.create_task(coalescer.submit(ROUTER, Query(f"q{i}"))) for i in range(6)]
        for _ in range(10):  # let every submit reach the queue
            await asyncio.sleep(0)
        assert coalescer.queued == 6
        runner.gate.set()
        decisions = await asyncio.gather(first, *rest)
    finally:
        await coalescer.close()
    assert [d.route for d in decisions] == ["first", *(f"q{i}" for i in range(6))]
    assert runner.batches[0] == ["first"]
    assert runner.batches[1:] == [["q0", "q1", "q2", "q3"], ["q4", "q5"]]


async def test_one_callers_failure_is_not_anothers() -> None:
    """A batch that fails is retried query by query: the bad query's caller gets the error,
    the others their decisions."""
    runner = Runner()
    runner.gate = asyncio.Event()
    coalescer = await _coalescer(runner)
    try:
        first = asyncio.create_task(coalescer.submit(ROUTER, Query("first")))
        await runner.started.wait()
        good = asyncio.create_task(coalescer.submit(ROUTER, Query("good")))
        bad = asyncio.create_task(coalescer.submit(ROUTER, Query("bad one")))
        for _ in range(10):
            await asyncio.sleep(0)
        runner.gate.set()
        assert (await first).route == "first"
        assert (await good).route == "good"
        with pytest.raises(ValueError, match="scripted failure"):
            await bad
    finally:
        await coalescer.close()
    assert ["good", "bad one"] in runner.batches  # tried together first
    assert ["good"] in runner.batches and ["bad one"] in runner.batches


async def test_a_caller_that_left_is_dropped_before_the_encoder() -> None:
    """A cancelled caller's query never reaches run_batch."""
    runner = Runner()
    runner.gate = asyncio.Event()
    coalescer = await _coalescer(runner)
    try:
        first = asyncio.create_task(coalescer.submit(ROUTER, Query("first")))
        await runner.started.wait()
        gone = asyncio.create_task(coalescer.submit(ROUTER, Query("gone")))
        kept = asyncio.create_task(coalescer.submit(ROUTER, Query("kept")))
        for _ in range(10):
            await asyncio.sleep(0)
        gone.cancel()
        runner.gate.set()
        await first
        assert (await kept).route == "kept"
    finally:
        await coalescer.close()
    assert all("gone" not in batch for batch in runner.batches)


async def test_close_answers_waiting_callers_not_ready() -> None:
    """Queries still queued when the coalescer closes get NotReady instead of waiting forever."""
    runner = Runner()
    runner.gate = asyncio.Event()
    coalescer = await _coalescer(runner)
    first = asyncio.create_task(coalescer.submit(ROUTER, Query("first")))
    await runner.started.wait()
    waiting = asyncio.create_task(coalescer.submit(ROUTER, Query("waiting")))
    for _ in range(10):
        await asyncio.sleep(0)
    closing = asyncio.create_task(coalescer.close())
    for _ in range(10):
        await asyncio.sleep(0)
    runner.gate.set()
    await closing
    assert (await first).route == "first"
    with pytest.raises(NotReady):
        await waiting


class InlineRunner:
    """The synchronous runner of the inline path: records the texts it routed."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, router: Any, queries: list[Query]) -> list[Decision]:
        self.texts.extend(q.text for q in queries)
        return [_decision(q.text) for q in queries]


async def test_lone_calls_run_inline_after_a_quiet_probe_and_probe_again() -> None:
    """Sequential lone calls: the first runs on the thread path (a probe that nobody interrupts),
    the next ``inline_after_probe`` run inline on the loop, then another probe; every caller
    gets its own decision either way."""
    runner, inline = Runner(), InlineRunner()
    coalescer = await _coalescer(runner, run_inline=inline, inline_after_probe=2)
    try:
        got = [(await coalescer.submit(ROUTER, Query(f"q{i}"))).route for i in range(6)]
    finally:
        await coalescer.close()
    assert got == [f"q{i}" for i in range(6)]
    assert runner.batches == [["q0"], ["q3"]]
    assert inline.texts == ["q1", "q2", "q4", "q5"]
    assert coalescer.inline_runs == 4


async def test_a_call_that_finds_the_service_busy_ends_inline_runs() -> None:
    """A probe during which another call arrives grants no inline runs: the burst is batched
    on the thread path, and the next lone call probes again instead of running inline."""
    runner, inline = Runner(), InlineRunner()
    coalescer = await _coalescer(runner, run_inline=inline, inline_after_probe=4)
    try:
        await coalescer.submit(ROUTER, Query("probe"))  # quiet: 4 inline runs granted
        for name in ("inline", "inline-2", "inline-3", "inline-4"):
            await coalescer.submit(ROUTER, Query(name))
        runner.gate = asyncio.Event()  # the next probe stays open until the burst is queued
        runner.started.clear()
        probe = asyncio.create_task(coalescer.submit(ROUTER, Query("probe-2")))
        await runner.started.wait()
        burst = [asyncio.create_task(coalescer.submit(ROUTER, Query(f"b{i}"))) for i in range(3)]
        await asyncio.sleep(0)
        runner.gate.set()
        await asyncio.gather(probe, *burst)
        runner.gate = None
        await coalescer.submit(ROUTER, Query("after"))
    finally:
        await coalescer.close()
    assert inline.texts == ["inline", "inline-2", "inline-3", "inline-4"]
    assert runner.batches[-3:] == [["probe-2"], ["b0", "b1", "b2"], ["after"]]
