"""The pure A/B and shadow logic (semroute.loop.arms): stable arms, the share over many keys,
agreement per route, and errors that name the field."""

from __future__ import annotations

import pytest

from semroute.errors import InvalidRequest
from semroute.loop.arms import (
    CANDIDATE,
    SERVING,
    Agreement,
    bucket,
    check_mode,
    check_share,
    choose_arm,
    sampled,
)
from semroute.types import Decision

KEYS = [f"tenant-{i}" for i in range(20_000)]


def _decision(route: str, target: str) -> Decision:
    return Decision(route, target, 0.9, False, "", {}, (target,))


def test_a_key_always_gets_the_same_arm() -> None:
    """The arm is a function of the key alone: the same key, asked again (and across
    processes: sha256, not the salted built-in hash), gets the same bucket and arm."""
    assert bucket("acme") == bucket("acme")
    assert 0.0 <= bucket("acme") < 1.0
    # Pinned: a change of the hashing would silently move tenants to the other arm.
    assert bucket("acme") == pytest.approx(0.8131515485639371, abs=1e-15)
    assert bucket("tenant-1") == pytest.approx(0.28244540659169337, abs=1e-15)
    arms = {k: choose_arm("ab", 0.3, k) for k in KEYS[:500]}
    assert all(choose_arm("ab", 0.3, k) == arm for k, arm in arms.items())


@pytest.mark.parametrize("share", [0.05, 0.1, 0.5, 0.9])
def test_the_candidate_serves_its_share_of_many_keys(share: float) -> None:
    """Over 20,000 keys the candidate's share is within 0.01 of the share asked for."""
    served = sum(choose_arm("ab", share, k) == CANDIDATE for k in KEYS) / len(KEYS)
    assert abs(served - share) < 0.01


def test_raising_the_share_only_moves_keys_to_the_candidate() -> None:
    """A key on the candidate at share 0.1 stays there at 0.2 (buckets are fixed points)."""
    low = {k for k in KEYS if choose_arm("ab", 0.1, k) == CANDIDATE}
    high = {k for k in KEYS if choose_arm("ab", 0.2, k) == CANDIDATE}
    assert low < high


def test_shadow_and_off_always_serve_from_the_serving_index() -> None:
    """Only ab mode sends traffic to the candidate, whatever the share."""
    assert {choose_arm("shadow", 1.0, k) for k in KEYS[:200]} == {SERVING}
    assert {choose_arm("off", 1.0, k) for k in KEYS[:200]} == {SERVING}
    assert {choose_arm("ab", 0.0, k) for k in KEYS[:200]} == {SERVING}
    assert {choose_arm("ab", 1.0, k) for k in KEYS[:200]} == {CANDIDATE}


def test_agreement_is_counted_per_served_route() -> None:
    """Same route and target agree; another target on the same route does not."""
    agreement = Agreement()
    assert agreement.record(_decision("code", "big"), _decision("code", "big"))
    assert not agreement.record(_decision("code", "big"), _decision("code", "small"))
    assert not agreement.record(_decision("math", "big"), _decision("code", "big"))
    snap = agreement.snapshot()
    assert (snap["code"].compared, snap["code"].agreed) == (2, 1)
    assert snap["code"].rate == 0.5
    assert (snap["math"].compared, snap["math"].agreed) == (1, 0)
    assert (agreement.overall.compared, agreement.overall.agreed) == (3, 1)


def test_log_sampling_takes_a_stable_share_of_request_ids() -> None:
    """sampled() keeps none at 0, all at 1, about the share in between, stably."""
    ids = [f"req-{i}" for i in range(10_000)]
    assert not any(sampled(i, 0.0) for i in ids)
    assert all(sampled(i, 1.0) for i in ids)
    kept = [i for i in ids if sampled(i, 0.25)]
    assert abs(len(kept) / len(ids) - 0.25) < 0.02
    assert kept == [i for i in ids if sampled(i, 0.25)]
    # Shadowing a share of traffic draws other ids than logging a share of differences.
    shadowed = {i for i in ids if sampled(i, 0.25, "shadow")}
    assert abs(len(shadowed) / len(ids) - 0.25) < 0.02
    assert abs(len(shadowed & set(kept)) / len(ids) - 0.25 * 0.25) < 0.02


def test_bad_mode_and_share_name_the_field() -> None:
    """A mode outside off/shadow/ab and a share outside [0, 1] (or NaN) are InvalidRequest
    naming the field they came from."""
    with pytest.raises(InvalidRequest) as exc:
        check_mode("canary")
    assert exc.value.field == "mode" and "off, shadow, ab" in str(exc.value)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(InvalidRequest) as exc:
            check_share(bad, "--share")
        assert exc.value.field == "--share"
    assert check_mode("ab") == "ab" and check_share(1.0) == 1.0
