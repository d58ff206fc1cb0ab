"""End to end on the local cluster (semroute.testing.cluster): 3 router replicas and 2
dispatchers behind a real nginx, a real Redis, a real Prometheus, fault servers as the LLMs.

16 clients (tests/e2e/cluster_load.py) route and chat through nginx for
``SEMROUTE_CLUSTER_TEST_S`` seconds (default 40) while router-0 is SIGKILLed, router-1 is
replaced by a replica on a new index version (started, SERVING, then swapped in), and near the
end dispatcher-0 is SIGKILLed with streams in flight. The fault servers wait ``LLM_DELAY_S``
before the first token and stream 8 chunks, so at the kill some chats are before their commit
point and some after it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from semroute.config import DEFAULT_ENCODER_DIR, DEFAULT_INDEX_DIR
from semroute.index import resolve_version_dir
from semroute.testing.cluster import Cluster, ClusterOptions
from semroute.testing.cluster_config import ACCESS_LOG
from tests.e2e.cluster_load import ChatOutcome, Load
from tests.proctree import descendants, wait_all_gone

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DURATION_S = float(os.environ.get("SEMROUTE_CLUSTER_TEST_S", "40"))
CHUNKS = 8
FULL_ANSWER = "".join(f"tok{i} " for i in range(CHUNKS))
CLIENTS = 16
LLM_DELAY_S = 0.3


def _chains(index_root: Path) -> tuple[str, dict[str, tuple[str, ...]]]:
    """(version, route -> target chain) of the version ``index_root`` serves."""
    manifest = json.loads((resolve_version_dir(index_root) / "manifest.json").read_text())
    routes = manifest["route_table"]["routes"]
    return manifest["version"], {name: tuple(r["targets"]) for name, r in routes.items()}


def _build_v2(out: Path) -> Path:
    """A second index version: the same exemplars with every route's target chain reversed, so
    each answer shows which version decided it."""
    routes = yaml.safe_load((REPO / "index_data" / "routes.yaml").read_text())
    for route in routes["routes"].values():
        route["targets"] = list(reversed(route["targets"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "routes.yaml").write_text(yaml.safe_dump(routes, sort_keys=False))
    subprocess.run(
        [sys.executable, "-c", "import sys; from semroute.cli import main; sys.exit(main())",
         "index", "build", "--exemplars", str(REPO / "index_data" / "exemplars.csv"),
         "--routes", str(out / "routes.yaml"), "--encoder", str(REPO / DEFAULT_ENCODER_DIR),
         "--out", str(out / "root"), "--no-tune", "--quiet"],
        check=True, cwd=REPO, capture_output=True,
    )
    return out / "root"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not (REPO / DEFAULT_INDEX_DIR / "current").exists():
        pytest.fail("the cluster test needs the default index: run `make setup`")
    # The stack's backends.yaml sizes local backends for llama.cpp (4 in flight); the fault
    # servers here take the whole load, which doubles on one dispatcher once the other is
    # killed, so every backend takes the test's 16 clients (no ConcurrencyLimited 429s).
    backends = yaml.safe_load((REPO / "deploy" / "backends.yaml").read_text())
    for entry in backends["backends"].values():
        entry["max_concurrency"] = 2 * CLIENTS
    template = tmp_path_factory.mktemp("backends") / "backends.yaml"
    template.write_text(yaml.safe_dump(backends, sort_keys=False))
    options = ClusterOptions(
        routers=3, dispatchers=2, llm_delay_s=LLM_DELAY_S, llm_chunks=CHUNKS,
        llm_chunk_delay_s=0.15, scrape_interval_s=1.0,
        backends_template=template,
        settings_template=REPO / "deploy" / "stack.yaml",
    )
    with Cluster.start(tmp_path_factory.mktemp("cluster"), index=REPO / DEFAULT_INDEX_DIR,
                       encoder=REPO / DEFAULT_ENCODER_DIR, options=options) as started:
        yield started


def _prom(cluster: Cluster, query: str) -> list[dict[str, object]]:
    reply = httpx.get(f"{cluster.prometheus_url}/api/v1/query", params={"query": query},
                      timeout=10.0, trust_env=False).json()
    assert reply["status"] == "success", reply
    result: list[dict[str, object]] = reply["data"]["result"]
    return result


def _value(sample: dict[str, object]) -> float:
    value = sample["value"]
    assert isinstance(value, list)
    return float(value[1])


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))


def test_replicas_fail_and_upgrade_under_load_without_failed_calls(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Through nginx, under 16 clients: a SIGKILLed router replica and another replaced by one
    on a new index version cost no call (nginx, or the client's gRPC retry policy, retries on
    another replica); every Route answer names
    one of the two versions and carries that version's target chain; Prometheus saw Route
    traffic on all three replicas and on both versions of router-1, and no chat used the
    dispatchers' static fallback. Then a dispatcher is SIGKILLed with chats in flight: chats
    before their first token are retried by nginx and answer in full; chats after it end with
    an error, no [DONE], and text that is a prefix of the answer (nothing repeated)."""
    v1, chains_v1 = _chains(cluster.index)
    v2_root = _build_v2(tmp_path / "v2")
    v2, chains_v2 = _chains(v2_root)
    chains = {v1: chains_v1, v2: chains_v2}
    assert v1 != v2

    door0 = f"127.0.0.1:{cluster.dispatchers[0].http_port}"
    load = Load(cluster.router_address, cluster.http_url, clients=CLIENTS)
    t0 = time.monotonic()
    load.start()
    try:
        _sleep_until(t0 + 0.25 * DURATION_S)
        cluster.kill_router(0)
        _sleep_until(t0 + 0.45 * DURATION_S)
        cluster.replace_router(1, index=v2_root)
        _sleep_until(t0 + 0.8 * DURATION_S)
        # Kill it while a stream from it is past its first token.
        assert load.wait_for_stream(door0), "no chat streamed from dispatcher-0"
        t_kill = time.monotonic()
        cluster.kill_dispatcher(0)
        _sleep_until(t0 + DURATION_S)
    finally:
        load.stop()
    assert cluster.first_dead() is None

    # Routing: no failed call; each answer consistent with the version that gave it.
    assert len(load.routes) >= 100
    failed = [r.error for r in load.routes if r.error]
    assert not failed, failed[:5]
    assert {r.version for r in load.routes} == {v1, v2}
    inconsistent = [r for r in load.routes if r.targets != chains[r.version][r.route]]
    assert not inconsistent, inconsistent[:5]

    # Chats before the dispatcher was killed: all answered in full.
    before = [c for c in load.chats if c.ended < t_kill]
    assert len(before) >= 100
    bad = [c for c in before if not _complete(c)]
    assert not bad, bad[:5]
    # A resend is the client's keep-alive race, not a failed call; it must stay rare.
    assert sum(c.resent for c in load.chats) <= max(1, len(load.chats) // 100)
    assert all(c.chain in (chains_v1[c.route], chains_v2[c.route]) for c in before)

    # Chats that met the kill: complete (nginx retried those before their first token), or
    # cut after it with an error and a prefix of the answer (possibly all of its text, when the
    # kill fell between the last token and the end of the stream: no [DONE], an error, and
    # never a duplicated token); none failed without text.
    met = [c for c in load.chats if c.ended >= t_kill]
    cut = [c for c in met if not _complete(c)]
    assert cut, "no stream was in flight on the killed dispatcher"
    for c in cut:
        assert c.status == 200 and c.text and not c.done, c
        assert FULL_ANSWER.startswith(c.text), c
        assert "RemoteProtocolError" in c.error or "error event" in c.error, c
    retried = [c for c in met if _complete(c) and c.upstream.startswith(door0 + ", ")]
    assert retried, "nginx retried no chat on the other dispatcher"

    # nginx passed router calls to another replica (the access log names every upstream tried).
    access = [json.loads(line) for line in
              (cluster.log_dir / "nginx" / ACCESS_LOG).read_text().splitlines()]
    router_port = str(cluster.router_address.rsplit(":", 1)[1])
    assert any(", " in e["upstream"] for e in access if e["port"] == router_port)

    print(f"\ncluster: {len(load.routes)} Route calls, {len(load.chats)} chats in "
          f"{DURATION_S:g} s; after the dispatcher kill: {len(met)} chats, {len(cut)} cut after "
          f"their first token, {len(retried)} retried by nginx; nginx access log: "
          f"{sum(e['status'] == '502' for e in access)} HTTP 502 (retried by the clients), "
          f"{sum(', ' in e['upstream'] for e in access)} calls passed to a second upstream")

    # Prometheus (scrape every 1 s; wait for two more scrapes).
    time.sleep(2.5)
    per_replica: dict[tuple[str, str], float] = {}
    for s in _prom(cluster, "max_over_time(semroute_router_arm_requests_total[10m])"):
        labels = s["metric"]
        assert isinstance(labels, dict)
        per_replica[(labels["replica"], labels["version"])] = _value(s)
    assert {replica for (replica, _), n in per_replica.items() if n > 0} == {
        "router-0", "router-1", "router-2"}, per_replica
    assert per_replica.get(("router-1", v1), 0) > 0 and per_replica.get(("router-1", v2), 0) > 0
    fallbacks = _prom(cluster, "sum(max_over_time(semroute_dispatcher_router_fallbacks_total[10m]))")
    assert not fallbacks or _value(fallbacks[0]) == 0, fallbacks
    up = {(s["metric"]["job"], _value(s)) for s in _prom(cluster, "up")  # type: ignore[index]
          if s["metric"]["job"] in ("nginx", "redis", "prometheus")}  # type: ignore[index]
    assert up == {("nginx", 1.0), ("redis", 1.0), ("prometheus", 1.0)}


def _complete(c: ChatOutcome) -> bool:
    return c.status == 200 and c.done and not c.error and c.text == FULL_ANSWER


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_runner_killed_or_stopped_leaves_no_process(tmp_path: Path, sig: signal.Signals) -> None:
    """`scripts/cluster.py` SIGKILLed (no chance to clean up) or sent SIGTERM (exits 0 after
    stopping its children) once the cluster is up: every process it started (routers,
    dispatchers, nginx with its worker, Prometheus, exporters, Redis, LLMs) is gone soon after."""
    out = tmp_path / "out.txt"
    with out.open("wb") as sink:
        runner = subprocess.Popen(
            [sys.executable, "scripts/cluster.py", "--routers", "2", "--log-dir",
             str(tmp_path / "logs")], cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while b"cluster is up" not in out.read_bytes():
            assert runner.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.5)
        children = descendants(runner.pid)
        names = " ".join(c.cmdline for c in children)
        for part in ("nginx: worker", "prometheus", "redis-server", "serve router",
                     "serve dispatcher"):
            assert part in names, names
        runner.send_signal(sig)
        code = runner.wait(30)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL), out.read_text()
        assert wait_all_gone(children, timeout=15) == []
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait(10)
