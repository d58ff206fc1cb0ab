"""Client-side load balancing over router replicas, without a proxy in between.

A gRPC channel resolves its target to a list of addresses and hands them to a load-balancing
policy. The default, ``pick_first``, sends every call down one connection, so a dispatcher
would stay on one router replica. ``round_robin`` keeps a connection to every address and
spreads calls over the ready ones, call by call, leaving out a replica whose connection failed
until it is back. Targets that can name several replicas:

- ``ipv4:10.0.0.1:50051,10.0.0.2:50051`` (or ``ipv6:[::1]:50051,[::1]:50052``): a fixed list;
- ``dns:///semroute-router:50051``: every address DNS returns (a Kubernetes headless Service
  lists every ready pod), re-resolved when a connection drops.

``lb_policy`` ``auto`` (the default) picks ``round_robin`` for those two forms and leaves any
other target (``host:port``, ``unix:``) on gRPC's default; ``round_robin`` and ``pick_first``
force one.
"""

from __future__ import annotations

POLICIES = ("auto", "round_robin", "pick_first")


def may_name_several(target: str) -> bool:
    """Can ``target`` resolve to more than one address? (a ``dns:`` target, or an ``ipv4:`` /
    ``ipv6:`` list with more than one entry)."""
    scheme, sep, rest = target.partition(":")
    if not sep:
        return False
    if scheme == "dns":
        return True
    return scheme in ("ipv4", "ipv6") and "," in rest


def resolve_policy(target: str, lb_policy: str = "auto") -> str | None:
    """The policy to ask for: ``round_robin``/``pick_first`` as given; for ``auto``,
    ``round_robin`` when the target may name several replicas, else None (gRPC's default).
    Raises ValueError for a policy not in ``POLICIES``."""
    if lb_policy not in POLICIES:
        raise ValueError(
            f"router load-balancing policy {lb_policy!r}: choose one of {', '.join(POLICIES)}"
        )
    if lb_policy != "auto":
        return lb_policy
    return "round_robin" if may_name_several(target) else None


def balancing_options(target: str, lb_policy: str = "auto") -> list[tuple[str, str]]:
    """Channel options that set the load-balancing policy ``resolve_policy`` chooses."""
    policy = resolve_policy(target, lb_policy)
    return [] if policy is None else [("grpc.lb_policy_name", policy)]
