"""docs/dashboard.png: the operator dashboard of a local stack (fake LLMs) after some traffic.

    .venv/bin/python scripts/dashboard_screenshot.py [--out docs/dashboard.png]

Starts the router, the dispatcher (exact cache on, two tenants with budgets) and fake LLM
servers, sends a few routed chats (some repeated: cache hits), then has headless Chromium load
``/dashboard`` with the admin token and save a screenshot.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import httpx
import yaml

from semroute.config import DEFAULT_ENCODER_DIR, DEFAULT_INDEX_DIR
from semroute.testing.browser import screenshot
from semroute.testing.devstack import DevStack, StackPorts

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "screenshot-admin"
TENANTS = {"team-a": "tok-a", "team-b": "tok-b"}
PROMPTS = (
    "Write a Python function that reverses a linked list",
    "Write a short poem about autumn leaves",
    "What is the capital of Australia?",
    "Explain the difference between TCP and UDP",
    "Summarise the plot of Hamlet in two sentences",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="semroute-dashboard-"))
    (tmp / "tokens").write_text("".join(f"{n} {t}\n" for n, t in TENANTS.items()))
    config = {
        "auth": {"tokens_file": str(tmp / "tokens"), "admin_tokens": [ADMIN]},
        "cache": {"exact": True},
        "budgets": {"tenants": {"team-a": {"usd_per_day": 0.0005, "usd_per_month": 0.01},
                                "team-b": {"usd_per_day": 0.0002}}},
        "loop": {"decision_log": ""},
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    with DevStack.start(
        tmp, index=ROOT / DEFAULT_INDEX_DIR, encoder=ROOT / DEFAULT_ENCODER_DIR,
        ports=StackPorts(http=0), fake_llm=True,
        dispatcher_args=("--config", str(tmp / "config.yaml")),
    ) as stack:
        assert stack.dispatcher is not None
        base = f"http://127.0.0.1:{stack.dispatcher.http_port}"
        with httpx.Client(base_url=base, timeout=60) as client:
            for round_ in range(3):
                for i, prompt in enumerate(PROMPTS):
                    tenant = "team-a" if i % 2 == 0 else "team-b"
                    body = {"model": "auto", "max_tokens": 64,
                            "messages": [{"role": "user", "content": prompt}]}
                    client.post("/v1/chat/completions", json=body,
                                headers={"authorization": f"Bearer {TENANTS[tenant]}"})
                if round_ == 0:
                    print("dashboard: first round sent; repeats are cache hits", flush=True)
        screenshot(f"{base}/dashboard#token={ADMIN}", args.out, size=(1000, 860))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
