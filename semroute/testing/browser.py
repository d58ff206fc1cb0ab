"""A real headless Chromium for page tests and screenshots, without a driver: Chromium's own
``--dump-dom`` (the DOM after the page's scripts ran) and ``--screenshot``.

Debian's ``chromium-headless-shell`` (or ``chromium``) package provides the browser
(``make setup`` installs it). ``--virtual-time-budget`` lets the page's timers and fetches run
for that much virtual time before the DOM is read, so a test waits for the page's own work, not
for the wall clock. The browser dies with its parent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from semroute.errors import StackError
from semroute.testing.devstack import die_with_parent

BINARIES = ("chromium-headless-shell", "chromium", "chromium-browser")


def find_chromium() -> str | None:
    return next((found for name in BINARIES if (found := shutil.which(name))), None)


def _run(args: list[str], timeout: float) -> bytes:
    binary = find_chromium()
    if binary is None:
        raise StackError("no headless Chromium: run `make setup` (Debian package "
                         "chromium-headless-shell)")
    with tempfile.TemporaryDirectory(prefix="semroute-chromium-") as profile:
        # --no-sandbox: tests run as root here, which Chromium's sandbox refuses.
        argv = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                f"--user-data-dir={profile}", *args]
        done = subprocess.run(
            argv, capture_output=True, timeout=timeout, check=False,
            preexec_fn=die_with_parent(),
        )
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace")[-800:]
        raise StackError(f"chromium exited with {done.returncode}: {tail}")
    return done.stdout


def dump_dom(url: str, *, budget_ms: int = 5000, timeout: float = 60.0) -> str:
    """The page's DOM (HTML) after ``budget_ms`` of virtual time."""
    out = _run([f"--virtual-time-budget={budget_ms}", "--dump-dom", url], timeout)
    return out.decode("utf-8", errors="replace")


def screenshot(
    url: str, out: Path, *, size: tuple[int, int] = (1100, 900), budget_ms: int = 5000,
    timeout: float = 60.0,
) -> Path:
    """A PNG of the page after ``budget_ms`` of virtual time, written to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _run([f"--virtual-time-budget={budget_ms}", f"--window-size={size[0]},{size[1]}",
          "--hide-scrollbars", f"--screenshot={out.resolve()}", url], timeout)
    if not out.exists():
        raise StackError(f"chromium wrote no screenshot to {out}")
    return out
