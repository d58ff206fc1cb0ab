"""semroute: a semantic router for fleets of LLMs.

``from semroute import Router`` gives the in-process router; heavy modules load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Decision", "Policy", "Query", "Router", "__version__"]

if TYPE_CHECKING:
    from semroute.router import Router
    from semroute.types import Decision, Policy, Query


def __getattr__(name: str) -> Any:
    # Lazy so that `import semroute` (e.g. from the CLI or the proto package) stays cheap.
    if name == "Router":
        from semroute.router import Router

        return Router
    if name in {"Decision", "Policy", "Query"}:
        from semroute import types

        return getattr(types, name)
    raise AttributeError(name)
