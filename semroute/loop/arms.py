"""Two index versions side by side: which one serves a request, and how often they agree.

Pure logic, no I/O; the router service wires it (``semroute.grpc.router_handle``).

- ``shadow``: the serving index answers every request; the candidate decides the same query off
  the response path and ``Agreement`` counts, per served route, how often it chose the same
  route and target.
- ``ab``: a share of traffic is served by the candidate. The arm is a function of a key (a
  tenant, a user, a session, else the request id), through sha256 rather than Python's
  ``hash()`` (salted per process), so a key gets the same arm on every replica and after
  restarts, and raising the share only moves keys from serving to candidate, never back.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass, field
from typing import Literal

from semroute.errors import InvalidRequest
from semroute.types import Decision

Mode = Literal["off", "shadow", "ab"]
MODES: tuple[Mode, ...] = ("off", "shadow", "ab")
SERVING = "serving"
CANDIDATE = "candidate"
_SALT = b"semroute-ab-v1:"


def check_mode(value: str, field_name: str = "mode") -> Mode:
    """``value`` as a Mode; InvalidRequest naming ``field_name`` otherwise."""
    for mode in MODES:
        if value == mode:
            return mode
    raise InvalidRequest(field_name, f"must be one of {', '.join(MODES)}; got {value[:40]!r}")


def check_share(value: float, field_name: str = "share") -> float:
    """``value`` if it is a share in [0, 1]; InvalidRequest naming ``field_name`` otherwise."""
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InvalidRequest(field_name, f"must be in [0, 1], got {value!r}")
    return float(value)


def bucket(key: str) -> float:
    """A stable point in [0, 1) for ``key`` (the first 8 bytes of a salted sha256)."""
    digest = hashlib.sha256(_SALT + key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def choose_arm(mode: Mode, share: float, key: str) -> str:
    """``CANDIDATE`` when ``mode`` is ab and ``key`` falls in the first ``share`` of buckets;
    ``SERVING`` otherwise (shadow and off always serve from the serving index)."""
    return CANDIDATE if mode == "ab" and bucket(key) < share else SERVING


def agrees(served: Decision, shadow: Decision) -> bool:
    """Two decisions agree when they pick the same route and the same first target."""
    return served.route == shadow.route and served.target == shadow.target


@dataclass
class RouteAgreement:
    compared: int = 0
    agreed: int = 0

    @property
    def rate(self) -> float:
        return self.agreed / self.compared if self.compared else 0.0


@dataclass
class Agreement:
    """Shadow comparisons per served route (thread-safe). Reset when the candidate changes."""

    routes: dict[str, RouteAgreement] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, served: Decision, shadow: Decision) -> bool:
        """Count one comparison under the served route; True when the decisions agree."""
        same = agrees(served, shadow)
        with self._lock:
            counts = self.routes.setdefault(served.route, RouteAgreement())
            counts.compared += 1
            counts.agreed += same
        return same

    def snapshot(self) -> dict[str, RouteAgreement]:
        with self._lock:
            return {r: RouteAgreement(c.compared, c.agreed) for r, c in self.routes.items()}

    @property
    def overall(self) -> RouteAgreement:
        total = RouteAgreement()
        for counts in self.snapshot().values():
            total.compared += counts.compared
            total.agreed += counts.agreed
        return total


def sampled(request_id: str, share: float, purpose: str = "log") -> bool:
    """Whether ``request_id`` is in a stable ``share`` of request ids for ``purpose`` ("log":
    a differing shadow decision is written to the log; "shadow": the query is shadowed). Each
    purpose has its own salt, independent of the A/B buckets and of the other purposes."""
    return share >= 1.0 or (share > 0 and bucket(f"{purpose}:{request_id}") < share)
