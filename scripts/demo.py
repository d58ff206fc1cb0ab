"""`make demo`: the whole semroute stack on this machine, a few prompts through it, then stop.

Starts two llama.cpp servers with SmolLM2-135M-Instruct (targets local-small and local-large),
the router on the default index and the dispatcher, all on free loopback ports; sends prompts of
different kinds through the dispatcher's gRPC API, printing each routing decision and the streamed
answer; shuts everything down and exits 0 (1 if a prompt failed). Cloud keys are not passed to
the services unless --allow-cloud, so nothing leaves the machine. The services die with the
demo, even when it is SIGKILLed, and the demo stops them when its own parent (``make``) dies
(PR_SET_PDEATHSIG, see ``semroute.testing.devstack``).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

from semroute.cli.dispatch_cmds import decision_line
from semroute.config import DEFAULT_ENCODER_DIR, DEFAULT_INDEX_DIR
from semroute.errors import SemrouteError
from semroute.grpc.dispatcher_client import DispatcherClient
from semroute.testing.devstack import (
    DevStack,
    die_with_my_parent,
    sigterm_as_keyboard_interrupt,
)
from semroute.types import (
    ChatRequest,
    DecisionEvent,
    DeltaEvent,
    DoneEvent,
    GenerationParams,
    Message,
)

REPO = Path(__file__).resolve().parents[1]
PROMPTS: tuple[tuple[str, str], ...] = (
    ("code", "Write a Python function that returns the n-th Fibonacci number."),
    ("math", "What is 17 multiplied by 23? Show the steps."),
    ("creative", "Write a two-line poem about the sea at night."),
    ("chit-chat", "Hi there! How are you doing today?"),
    (
        "personal data",
        "My card 4111 1111 1111 1111 was charged twice. Write a short note to my bank and "
        "reply to jane.doe@example.com.",
    ),
)


def _rule(title: str) -> str:
    return f"\n── {title} " + "─" * max(4, 72 - len(title))


async def _ask(address: str, prompt: str, max_tokens: int) -> bool:
    """One prompt through the dispatcher; prints decision, streamed text and a summary."""
    request = ChatRequest(
        messages=(Message("user", prompt),),
        params=GenerationParams(max_tokens=max_tokens, temperature=0.0, seed=1),
    )
    streamed = False
    async with DispatcherClient(address) as client:
        try:
            async for event in client.chat(request, timeout=120.0):
                if isinstance(event, DecisionEvent):
                    print(decision_line(event), flush=True)
                elif isinstance(event, DeltaEvent):
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                    streamed = True
                elif isinstance(event, DoneEvent):
                    print(
                        f"\n[done target={event.target} tokens={event.prompt_tokens}+"
                        f"{event.completion_tokens} cost=${event.cost_usd:.8f} "
                        f"ttft={event.ttft_s * 1000:.0f}ms attempts={event.attempts}]",
                        flush=True,
                    )
        except SemrouteError as exc:
            newline = "\n" if streamed else ""
            print(f"{newline}[failed: {exc}]", flush=True)
            return False
    return True


async def _run_prompts(address: str, max_tokens: int) -> int:
    failed = 0
    for kind, prompt in PROMPTS:
        print(_rule(kind))
        print(f"> {prompt}")
        if not await _ask(address, prompt, max_tokens):
            failed += 1
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=REPO / DEFAULT_INDEX_DIR)
    parser.add_argument("--encoder", type=Path, default=REPO / DEFAULT_ENCODER_DIR)
    parser.add_argument("--backends", type=Path, default=REPO / "deploy" / "backends.yaml",
                        help="backends template; local base_urls are rewritten to the run's ports")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--allow-cloud", action="store_true",
                        help="pass OPENAI_API_KEY to the dispatcher (cloud targets may answer)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the services' log files")
    args = parser.parse_args(argv)
    if not (args.index / "current").exists():
        print(f"demo: no index at {args.index}; run `make setup` first", file=sys.stderr)
        return 2

    start = time.monotonic()
    log_dir = Path(tempfile.mkdtemp(prefix="semroute-demo-"))
    failed = 1
    try:
        with sigterm_as_keyboard_interrupt(), DevStack.start(
            log_dir,
            index=args.index,
            encoder=args.encoder,
            backends_template=args.backends,
            dispatcher_args=("--config", str(REPO / "deploy" / "stack.yaml")),
            allow_cloud=args.allow_cloud,
            progress=lambda msg: print(f"demo: {msg}", flush=True),
        ) as stack:
            assert stack.router is not None and stack.dispatcher is not None
            ready = time.monotonic() - start
            llamas = ", ".join(f"{a} :{s.port}" for a, s in stack.llamas.items())
            print(
                f"demo: stack up in {ready:.1f} s: {llamas}; router :{stack.router.port}; "
                f"dispatcher :{stack.dispatcher.port}",
                flush=True,
            )
            failed = asyncio.run(_run_prompts(stack.dispatcher.address, args.max_tokens))
            print(_rule("shutting down"), flush=True)
    except SemrouteError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted; services stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep_logs or failed:
            print(f"demo: service logs kept in {log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)
    total = time.monotonic() - start
    outcome = "all answered" if not failed else f"{failed} prompt(s) failed"
    print(f"demo: {len(PROMPTS)} prompts, {outcome}; {total:.1f} s in all", flush=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    die_with_my_parent()  # `make demo` killed: the demo and, through it, its services stop
    sys.exit(main())
