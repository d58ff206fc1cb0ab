"""The operator dashboard in a real headless Chromium against a running stack: router,
dispatcher (exact cache on, an admin token, a budget) and fake LLM servers, each a process of
its own. The page, given the admin token in its URL fragment, shows the numbers the dispatcher
counted: answers, spend, cache hit rate, the route/target table, breakers and the budget."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from semroute.config import DEFAULT_ENCODER_DIR, DEFAULT_INDEX_DIR
from semroute.testing.browser import dump_dom, find_chromium, screenshot
from semroute.testing.devstack import DevStack, StackPorts

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ADMIN = "dashboard-admin-token"
USER = "dashboard-user-token"


@pytest.fixture(scope="module")
def cached_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    if find_chromium() is None:
        pytest.fail("no headless Chromium: run `make setup` (chromium-headless-shell)")
    tmp = tmp_path_factory.mktemp("dashboard")
    (tmp / "tokens").write_text(f"team-a {USER}\n")
    config = {
        "auth": {"tokens_file": str(tmp / "tokens"), "admin_tokens": [ADMIN]},
        "cache": {"exact": True},
        "budgets": {"tenants": {"team-a": {"usd_per_day": 2.0}}},
        "loop": {"decision_log": ""},
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    with DevStack.start(
        tmp, index=REPO / DEFAULT_INDEX_DIR, encoder=REPO / DEFAULT_ENCODER_DIR,
        ports=StackPorts(http=0), fake_llm=True,
        dispatcher_args=("--config", str(tmp / "config.yaml")),
    ) as stack:
        yield stack


def _text(dom: str, element_id: str) -> str:
    found = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert found is not None, f"#{element_id} not in the page"
    return html.unescape(found.group(1))


def _rows(dom: str, table_id: str) -> list[list[str]]:
    body = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody>', dom, re.S)
    assert body is not None, f"table #{table_id} not in the page"
    return [
        [html.unescape(c) for c in re.findall(r"<td[^>]*>([^<]*)(?:<div|</td>)", row)]
        for row in re.findall(r"<tr>(.*?)</tr>", body.group(1), re.S)
    ]


def test_page_shows_the_dispatchers_numbers(cached_stack: DevStack, tmp_path: Path) -> None:
    """Two forced chats and one repeat (a cache hit): the page shows 3 answers, a 33.3% hit
    rate, the spend the answers reported, both targets in the table, every breaker closed and
    team-a's budget; the same numbers as /dashboard/data. A screenshot is taken."""
    assert cached_stack.dispatcher is not None
    base = f"http://127.0.0.1:{cached_stack.dispatcher.http_port}"
    auth = {"authorization": f"Bearer {USER}"}
    spent = 0.0
    with httpx.Client(base_url=base, headers=auth, timeout=30) as client:
        for model, text in (("local-small", "hello"), ("local-large", "hi"),
                            ("local-small", "hello")):
            body = {"model": model, "messages": [{"role": "user", "content": text}]}
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            spent += r.json()["usage"]["cost_usd"]
        data = client.get("/dashboard/data",
                          headers={"authorization": f"Bearer {ADMIN}"}).json()
    dom = dump_dom(f"{base}/dashboard#token={ADMIN}")
    assert 'data-loaded="1"' in dom, dom[-2000:]
    assert _text(dom, "requests-total") == "3"
    assert _text(dom, "hit-rate") == "33.3%"
    assert float(_text(dom, "spend")) == pytest.approx(spent, rel=0.01)
    assert float(_text(dom, "spend")) == pytest.approx(data["totals"]["cost_usd"], rel=0.01)
    routes = {(r[0], r[1]): int(r[2]) for r in _rows(dom, "routes")}
    assert routes == {("forced", "local-small"): 2, ("forced", "local-large"): 1}
    breakers = dict(tuple(r) for r in _rows(dom, "breakers"))
    assert set(breakers.values()) == {"closed"} and "local-small" in breakers
    (budget,) = _rows(dom, "budgets")
    assert budget[0] == "team-a" and float(budget[2]) == 2.0
    assert float(_text(dom, "ttft-p50")) == data["ttft_ms"]["p50"]
    shot = screenshot(f"{base}/dashboard#token={ADMIN}", tmp_path / "dashboard.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_without_a_token_asks_for_one(cached_stack: DevStack) -> None:
    """Without a token the page shows the login form and the door's 401 message, no data."""
    assert cached_stack.dispatcher is not None
    dom = dump_dom(f"http://127.0.0.1:{cached_stack.dispatcher.http_port}/dashboard")
    assert 'id="login" style="display: block;"' in dom
    assert "missing bearer token" in dom
    assert _text(dom, "requests-total") == "-"
