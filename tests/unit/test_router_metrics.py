"""Router metrics: per-server registries, index version gauge, cache hit ratio."""

from __future__ import annotations

from semroute.metrics import RouterMetrics


def test_each_server_has_its_own_registry() -> None:
    """Two RouterMetrics in one process do not collide or share counts."""
    a, b = RouterMetrics(), RouterMetrics()
    a.rpc.observe("Route", "OK", 0.002)
    a.rpc.observe("Route", "INVALID_ARGUMENT", 0.001)
    assert a.registry.get_sample_value(
        "semroute_router_requests_total", {"method": "Route", "code": "OK"}) == 1
    assert b.registry.get_sample_value(
        "semroute_router_requests_total", {"method": "Route", "code": "OK"}) is None
    assert a.registry.get_sample_value(
        "semroute_router_request_seconds_count", {"method": "Route"}) == 2


def test_index_version_gauge_names_only_the_serving_version() -> None:
    """After a swap the old version's series disappears; size follows the new index."""
    m = RouterMetrics()
    m.set_index("v1", 10)
    m.set_index("v2", 12)
    assert m.registry.get_sample_value("semroute_router_index_version_info", {"version": "v1"}) \
        is None
    assert m.registry.get_sample_value("semroute_router_index_version_info", {"version": "v2"}) == 1
    assert m.registry.get_sample_value("semroute_router_index_exemplars") == 12


def test_cache_counters_are_read_at_scrape_time() -> None:
    """Hit ratio is hits / lookups from the live counters (0 before any lookup)."""
    counts = {"hits": 0, "misses": 0}
    m = RouterMetrics()
    m.watch_cache(lambda: counts["hits"], lambda: counts["misses"])
    assert m.registry.get_sample_value("semroute_router_embedding_cache_hit_ratio") == 0
    counts.update(hits=3, misses=1)
    assert m.registry.get_sample_value("semroute_router_embedding_cache_hit_ratio") == 0.75
    assert m.registry.get_sample_value("semroute_router_embedding_cache_hits") == 3
