"""The locality guarantee: a prompt with personal data never reaches a non-local backend.

Proof is what the cloud fault servers recorded: no request at all, whatever the router, a rule,
a forced target or a failing local backend would otherwise have done.
"""

from __future__ import annotations

from typing import Any

import pytest

from semroute.dispatch.pii import PiiDetector
from semroute.dispatch.rules import Rule, RuleEngine
from semroute.errors import InvalidRequest, NoTargetAvailable, SemrouteError
from semroute.testing.faultserver import FaultServer, FaultSpec
from semroute.types import ChatEvent, ChatRequest, Decision, Message, Policy, RoutingOverrides
from tests.integration.dispatcher_fixtures import (
    CLOUD,
    CREATIVE_PROMPT,
    StackFactory,
    llms,
    make_stack,
    split,
    user,
)

pytestmark = pytest.mark.integration
__all__ = ["llms", "make_stack"]  # fixtures, imported for pytest

PII_PROMPTS = {
    "email": "Write a short poem for jane.doe@example.com about autumn leaves",
    "phone": "Write a short poem about autumn, then text it to +44 20 7946 0958",
    "card": "Write a short poem about my card 4111 1111 1111 1111 and autumn leaves",
    "iban": "Write a short poem about autumn; pay it to GB82 WEST 1234 5698 7654 32",
    "ssn": "Write a short poem about autumn leaves for SSN 123-45-6789",
    "credential": "Write a poem about autumn and my key sk-abcdefghijklmnopqrstuvwx123456",
}


def cloud_requests(servers: dict[str, FaultServer]) -> int:
    return sum(len(servers[name].requests) for name in CLOUD)


async def run(stack: Any, req: ChatRequest) -> tuple[list[ChatEvent], SemrouteError | None]:
    events: list[ChatEvent] = []
    try:
        async for event in stack.client.chat(req):
            events.append(event)
    except SemrouteError as exc:
        return events, exc
    return events, None


def cloud_rule() -> RuleEngine:
    """Every prompt goes to the cloud chain (a rule that would leak if PII were ignored)."""
    return RuleEngine(
        [Rule("all-to-cloud", "general", ("gpt-4o-mini", "gpt-4o"), min_chars=1)], PiiDetector()
    )


async def test_non_pii_prompt_does_reach_the_cloud(make_stack: StackFactory) -> None:
    """Control: without personal data the cloud rule sends the prompt to the cloud, so the
    assertions below are not vacuous."""
    stack = await make_stack(rules=cloud_rule())
    events, error = await run(stack, user(CREATIVE_PROMPT))
    assert error is None and split(events)[2].target == "gpt-4o-mini"
    assert cloud_requests(stack.llms) == 1


@pytest.mark.parametrize("kind", sorted(PII_PROMPTS))
async def test_pii_routed_to_cloud_by_a_rule_is_moved_to_local(
    make_stack: StackFactory, kind: str
) -> None:
    """Each kind of personal data moves a cloud-bound prompt to the local backends; the
    decision says why; the cloud servers receive nothing."""
    stack = await make_stack(rules=cloud_rule())
    events, error = await run(stack, user(PII_PROMPTS[kind]))
    assert error is None
    decision, _, done = split(events)
    assert decision.chain == ("local-small", "local-large")
    assert f"personal data detected: {kind}" in decision.reason
    assert done.target == "local-small"
    assert cloud_requests(stack.llms) == 0
    assert stack.llms["local-small"].chat_requests()[0].text == PII_PROMPTS[kind]


async def test_pii_with_forced_cloud_target_is_refused(make_stack: StackFactory) -> None:
    """Forcing a cloud target for a prompt with personal data is INVALID_ARGUMENT; nothing is
    sent anywhere."""
    stack = await make_stack()
    events, error = await run(stack, user(PII_PROMPTS["card"], force_target="gpt-4o"))
    assert events == []
    assert isinstance(error, InvalidRequest) and error.field == "overrides.force_target"
    assert "personal data detected: card" in str(error)
    assert all(s.requests == [] for s in stack.llms.values())


async def test_local_failure_never_falls_back_to_cloud(
    make_stack: StackFactory, default_router: Any
) -> None:
    """The real router's chain for this route ends in the cloud; with PII and the local target
    down, the chat fails rather than fall back to the cloud."""
    stack = await make_stack()
    assert default_router.route(CREATIVE_PROMPT).targets == ("local-small", "gpt-4o-mini")
    stack.llms["local-small"].set_default(FaultSpec("500"))
    events, error = await run(stack, user(PII_PROMPTS["email"]))
    assert isinstance(error, NoTargetAvailable)
    assert events[0].chain == ("local-small",)  # type: ignore[union-attr]
    assert len(stack.llms["local-small"].chat_requests()) == 2
    assert cloud_requests(stack.llms) == 0
    # Control: the same failure without PII does fall back to the cloud target.
    events, error = await run(stack, user(CREATIVE_PROMPT))
    assert error is None and split(events)[2].target == "gpt-4o-mini"


async def test_pii_in_earlier_messages_counts(make_stack: StackFactory) -> None:
    """Personal data in the system prompt or an earlier turn is sent upstream too, so it keeps
    the whole chat local even when the last message is harmless."""
    stack = await make_stack(rules=cloud_rule())
    req = ChatRequest((
        Message("system", "The customer is Ann, phone (415) 555-2671."),
        Message("user", "hello"), Message("assistant", "Hi!"),
        Message("user", CREATIVE_PROMPT),
    ))
    events, error = await run(stack, req)
    assert error is None and split(events)[2].target == "local-small"
    assert cloud_requests(stack.llms) == 0


class _CloudOnlyRouter:
    """A router that ignores require_local. The real router honours the policy, so only a
    deliberately wrong one can show that the dispatcher does not rely on it."""

    def __init__(self) -> None:
        self.policies: list[Policy] = []

    async def route(self, text: str, **kw: Any) -> Decision:
        self.policies.append(kw["policy"])
        return Decision("creative", "gpt-4o-mini", 0.9, False, "wrong on purpose", {},
                        ("gpt-4o-mini", "gpt-4o"))


async def test_dispatcher_enforces_locality_even_if_the_router_does_not(
    make_stack: StackFactory,
) -> None:
    """The router is asked with require_local; if it still answers with cloud targets, the
    dispatcher drops them and uses the local backends."""
    router = _CloudOnlyRouter()
    stack = await make_stack(router=router)
    events, error = await run(stack, user(PII_PROMPTS["iban"]))
    assert error is None
    assert router.policies[-1].require_local
    decision, _, done = split(events)
    assert decision.chain == ("local-small", "local-large") and done.target == "local-small"
    assert cloud_requests(stack.llms) == 0


async def test_require_local_override_and_rule_flag(make_stack: StackFactory) -> None:
    """overrides.require_local and a rule's require_local keep a prompt local without PII."""
    stack = await make_stack()
    events, _ = await run(stack, ChatRequest(
        (Message("user", CREATIVE_PROMPT),), overrides=RoutingOverrides(require_local=True)))
    assert events[0].chain == ("local-small",)  # type: ignore[union-attr]
    rules = RuleEngine([Rule("hr", "sensitive", ("gpt-4o", "local-large"), keywords=None,
                             min_chars=1, require_local=True)])
    stack2 = await make_stack(rules=rules)
    events, error = await run(stack2, user(CREATIVE_PROMPT))
    assert error is None and split(events)[0].chain == ("local-large",)
    assert cloud_requests(stack.llms) == 0
