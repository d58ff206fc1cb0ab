"""The dashboard's page and data on the real HTTP door: the numbers are the dispatcher's own
(answers by route and target, spend, savings, cache hit rate, TTFT percentiles, breakers,
budgets), the data needs an admin token, and the page is one self-contained document."""

from __future__ import annotations

import httpx
import pytest

from semroute.testing.faultserver import FaultSpec
from tests.integration.ledger_fixtures import (
    ADMIN_TOKEN,
    PRICES,
    LedgerFactory,
    LedgerStack,
    ledger_llms,
    make_ledger_stack,
)

pytestmark = pytest.mark.integration
__all__ = ["ledger_llms", "make_ledger_stack"]  # fixtures, imported for pytest


def _body(text: str) -> dict[str, object]:
    return {"model": "auto", "messages": [{"role": "user", "content": text}]}


async def test_data_counts_what_the_dispatcher_did(make_ledger_stack: LedgerFactory) -> None:
    """Three answers (one from cache, one after failover to local-small): the data shows them
    by route and target with their spend, the savings, a 1/3 hit rate, TTFT percentiles, the
    breakers and team-a's budget use."""
    stack = await make_ledger_stack(
        cache__exact=True, budgets__tenants={"team-a": {"usd_per_day": 1.0}}
    )
    url = f"{stack.door.base_url}/chat/completions"
    async with httpx.AsyncClient(headers=LedgerStack.headers("team-a")) as c:
        first = (await c.post(url, json=_body("first question"))).json()
        await c.post(url, json=_body("first question"))  # cache hit
        stack.llms["gpt-4o-mini"].set_default(FaultSpec("500"))
        fallback = (await c.post(url, json=_body("second question"))).json()
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    async with httpx.AsyncClient(base_url=stack.door.base_url.removesuffix("/v1")) as c:
        data = (await c.get("/dashboard/data", headers=admin)).json()
    rows = {(r["route"], r["target"]): r for r in data["by_route_target"]}
    assert rows[("general", "gpt-4o-mini")]["requests"] == 2
    assert rows[("general", "local-small")]["requests"] == 1
    spent = first["usage"]["cost_usd"] + fallback["usage"]["cost_usd"]
    assert data["totals"]["requests"] == 3
    assert data["totals"]["cost_usd"] == pytest.approx(spent, abs=1e-9)
    cin, cout = PRICES["gpt-4o-mini"]
    u = fallback["usage"]
    fallback_counterfactual = (u["prompt_tokens"] * cin + u["completion_tokens"] * cout) / 1e6
    assert data["totals"]["savings_usd"] == pytest.approx(
        first["usage"]["cost_usd"] + fallback_counterfactual - fallback["usage"]["cost_usd"],
        abs=1e-9,
    )
    assert data["totals"]["cache_saved_usd"] == pytest.approx(first["usage"]["cost_usd"])
    assert data["cache"] == {"enabled": True, "hit": 1, "miss": 2, "bypass": 0,
                             "hit_rate": pytest.approx(1 / 3, abs=1e-4)}
    assert data["ttft_ms"]["n"] == 3 and data["ttft_ms"]["p50"] <= data["ttft_ms"]["p95"]
    assert {b["target"] for b in data["breakers"]} == set(PRICES)
    (budget,) = data["budgets"]
    assert budget["tenant"] == "team-a" and budget["day_limit_usd"] == 1.0
    assert budget["day_usd"] == pytest.approx(spent, abs=1e-9)
    assert data["state"] == {"backend": "local", "up": True}


async def test_data_needs_an_admin_token_and_the_page_is_self_contained(
    make_ledger_stack: LedgerFactory,
) -> None:
    """No token: 401; a tenant's token: 403 (the data shows every tenant's spend); the page
    itself carries no data, loads nothing from elsewhere, and is served with a strict CSP."""
    stack = await make_ledger_stack()
    async with httpx.AsyncClient(base_url=stack.door.base_url.removesuffix("/v1")) as c:
        assert (await c.get("/dashboard/data")).status_code == 401
        denied = await c.get("/dashboard/data", headers=LedgerStack.headers("team-a"))
        page = await c.get("/dashboard")
    assert denied.status_code == 403
    assert "admin token" in denied.json()["error"]["message"]
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    html = page.text
    assert "<script>" in html and "http://" not in html and "https://" not in html
    assert 'id="hit-rate"' in html and "setInterval(refresh, 3000)" in html
