"""What the operator dashboard shows, read from the dispatcher's own state: its Prometheus
counters (answers, spend, counterfactual spend, cache results, chats by outcome), the ledger's
latest times to first token, the backends' breakers and the tenants' budgets.

``snapshot(metrics, ledger, backends)`` returns plain JSON-ready data; the HTTP door serves it at
``/dashboard/data`` and the page at ``/dashboard`` renders it.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Any

from prometheus_client import Counter

from semroute.dispatch.ledger import Ledger
from semroute.dispatch.metrics import DispatchMetrics
from semroute.dispatch.pool import BackendPool


def _samples(counter: Counter) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every ``_total`` sample of a labelled counter."""
    return [
        (dict(s.labels), s.value)
        for metric in counter.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    ]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _by_route_target(m: DispatchMetrics) -> tuple[list[dict[str, Any]], set[str]]:
    rows: dict[tuple[str, str], dict[str, Any]] = defaultdict(
        lambda: {"requests": 0, "cost_usd": 0.0, "counterfactual_usd": 0.0, "cache_saved_usd": 0.0}
    )
    tenants: set[str] = set()
    for field, counter in (
        ("requests", m.answers), ("cost_usd", m.cost_usd),
        ("counterfactual_usd", m.counterfactual_usd), ("cache_saved_usd", m.cache_saved_usd),
    ):
        for labels, value in _samples(counter):
            rows[(labels["route"], labels["target"])][field] += value
            tenants.add(labels["tenant"])
    out = [
        {"route": route, "target": target, **{k: round(v, 9) for k, v in row.items()}}
        for (route, target), row in sorted(rows.items())
    ]
    for row in out:
        row["requests"] = int(row["requests"])
    return out, tenants


async def snapshot(
    m: DispatchMetrics, ledger: Ledger, backends: BackendPool
) -> dict[str, Any]:
    """The dashboard's data (see the module docstring): a dispatcher's metrics, ledger and
    backends."""
    rows, tenants = _by_route_target(m)
    cache = {labels["result"]: int(v) for labels, v in _samples(m.cache_requests)}
    looked_up = sum(cache.values())
    cost = sum(r["cost_usd"] for r in rows)
    counterfactual = sum(r["counterfactual_usd"] for r in rows)
    ttfts = [t for _, t in ledger.recent_ttft]
    guard = ledger.guard
    budgets = []
    for tenant in sorted(tenants | set(guard.settings.tenants)):
        limits, _ = guard.limits(tenant)
        if limits.usd_per_day is None and limits.usd_per_month is None:
            continue
        day, month = await guard.spent(tenant)
        budgets.append({
            "tenant": tenant, "day_usd": round(day, 9), "day_limit_usd": limits.usd_per_day,
            "month_usd": round(month, 9), "month_limit_usd": limits.usd_per_month,
        })
    return {
        "generated_at": time.time(),
        "totals": {
            "requests": sum(r["requests"] for r in rows),
            "cost_usd": round(cost, 9),
            "counterfactual_usd": round(counterfactual, 9),
            "savings_usd": round(counterfactual - cost, 9),
            "cache_saved_usd": round(sum(r["cache_saved_usd"] for r in rows), 9),
        },
        "by_route_target": rows,
        "chats": {labels["outcome"]: int(v) for labels, v in _samples(m.chats)},
        "cache": {
            "enabled": ledger.cache is not None,
            "hit": cache.get("hit", 0), "miss": cache.get("miss", 0),
            "bypass": cache.get("bypass", 0),
            "hit_rate": round(cache.get("hit", 0) / looked_up, 4) if looked_up else None,
        },
        "ttft_ms": {
            "n": len(ttfts),
            "p50": round(statistics.median(ttfts) * 1000, 3) if ttfts else None,
            "p95": round(_pct(ttfts, 95) * 1000, 3) if ttfts else None,
        },
        "breakers": [
            {"target": name, "state": backend.breaker.state.value}
            for name, backend in sorted(backends.backends.items())
        ],
        "budgets": budgets,
        "state": {"backend": guard.state.where, "up": bool(getattr(guard.state, "up", True))},
    }
