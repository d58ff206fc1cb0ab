"""`semroute index promote / rollback / history` as a user runs them (the real command in a
subprocess), with a real router watching the root: it follows each switch without any RPC."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from semroute.grpc.router_client import RouterClient
from tests.conftest import run_cli
from tests.integration.router_grpc_support import (
    ROWS_V1,
    ROWS_V2,
    build_small_index,
    router_settings,
    running_router,
)

pytestmark = pytest.mark.integration


async def _serving(client: RouterClient, version: str) -> bool:
    for _ in range(200):
        if (await client.index_info()).version == version:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_promote_and_rollback_move_a_watching_router(tmp_path: Path) -> None:
    """Promote v1 back over v2, then roll back: the router follows both through its watch;
    the history names both with their reason; an unknown version exits 2 naming the versions
    there are."""
    root = tmp_path / "idx"
    v1 = build_small_index(root, ROWS_V1)
    v2 = build_small_index(root, ROWS_V2)
    settings = router_settings(router_server__watch_interval_s=0.05)
    async with running_router(root, settings=settings) as r, RouterClient(r.addr) as client:
        assert (await client.index_info()).version == v2.name
        out = await asyncio.to_thread(run_cli, "index", "promote", str(root), v1.name,
                                      "--reason", "v2 regressed on math", "--by", "ops")
        assert f"promoted {v1.name} (was {v2.name})" in out.stdout
        assert await _serving(client, v1.name)
        out = await asyncio.to_thread(run_cli, "index", "rollback", str(root),
                                      "--reason", "false alarm")
        assert f"rolled back to {v2.name}" in out.stdout
        assert await _serving(client, v2.name)
        assert r.metrics.registry.get_sample_value("semroute_router_reload_failed") == 0
    out = run_cli("index", "history", str(root))
    assert "promote" in out.stdout and "v2 regressed on math" in out.stdout
    assert "by ops" in out.stdout and f"serving: {v2.name}" in out.stdout
    bad = run_cli("index", "promote", str(root), "no-such-version", "--reason", "x", check=False)
    assert bad.returncode == 2
    assert "no index version 'no-such-version'" in bad.stderr and v1.name in bad.stderr
    missing = run_cli("index", "promote", str(root), v1.name, check=False)
    assert missing.returncode == 2 and "--reason" in missing.stderr
