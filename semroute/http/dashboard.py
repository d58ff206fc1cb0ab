"""The operator dashboard: one self-contained page (no build step, no CDN) on the HTTP door.

``GET /dashboard`` is the page; it holds no data. Its script reads ``/dashboard/data`` (the
dispatcher's ``semroute.dispatch.stats.snapshot``) every ``REFRESH_S`` seconds with the bearer
token the operator gives once: in the URL fragment (``/dashboard#token=...``: a fragment never
reaches the server or its logs) or typed into the page; it is kept in the tab's
sessionStorage. The data needs an admin token when auth is on (it shows every tenant's spend).
"""

from __future__ import annotations

import functools
from importlib import resources

REFRESH_S = 3

@functools.cache
def page() -> str:
    """The page (``dashboard.html`` beside this module, package data), read once."""
    html = resources.files("semroute.http").joinpath("dashboard.html").read_text(encoding="utf-8")
    return html.replace("REFRESH_MS", str(REFRESH_S * 1000))
