"""Budgets and rate limits per tenant over the in-process state: reserve before, settle after,
UTC windows, the errors' messages, and named tokens in the token file."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from semroute.auth import TokenSet
from semroute.config import AuthSettings, BudgetSettings, TenantLimits, load_settings
from semroute.dispatch.state import LocalState, Windows
from semroute.dispatch.tenants import TenantGuard
from semroute.errors import ConfigError, InsufficientQuota, RateLimitExceeded

NOON = datetime(2026, 12, 31, 12, 0, 30, tzinfo=UTC).timestamp()


def _guard(clock: list[float], **limits: object) -> TenantGuard:
    settings = BudgetSettings(tenants={"team-a": TenantLimits(**limits)})  # type: ignore[arg-type]
    return TenantGuard(settings, LocalState(), clock=lambda: clock[0])


def test_windows_name_utc_day_month_minute_and_their_resets() -> None:
    """The last day of a year resets at the next midnight UTC, its month on January 1st."""
    w = Windows.at(NOON)
    assert (w.day, w.month) == ("20261231", "202612")
    assert w.day_reset == datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    assert w.month_reset == w.day_reset
    assert w.minute_reset == datetime(2026, 12, 31, 12, 1, tzinfo=UTC).timestamp()


async def test_budget_refuses_what_does_not_fit_and_settles_to_actual() -> None:
    """Reservations count at once; settling replaces the estimate by the actual cost, so the
    room freed is usable again; the refusal names the limit, the field and the reset."""
    clock = [NOON]
    guard = _guard(clock, usd_per_day=1.0)
    first = await guard.reserve("team-a", 0.6)
    with pytest.raises(InsufficientQuota) as refused:
        await guard.reserve("team-a", 0.6)
    message = str(refused.value)
    assert "'team-a'" in message and "1 USD budget" in message
    assert "budgets.tenants.team-a.usd_per_day" in message
    assert "resets at 2027-01-01T00:00:00Z" in message
    assert refused.value.retry_after_s == pytest.approx(11 * 3600 + 59 * 60 + 30)
    await guard.settle("team-a", first, 0.1, 50)
    assert await guard.spent("team-a") == (pytest.approx(0.1), pytest.approx(0.1))
    await guard.reserve("team-a", 0.6)
    clock[0] += 12 * 3600  # the next UTC day (and month)
    assert await guard.spent("team-a") == (0.0, 0.0)
    await guard.reserve("team-a", 0.9)


async def test_month_budget_outlives_the_day() -> None:
    """A month budget spent on one day still refuses the next day, naming usd_per_month."""
    clock = [NOON - 86_400 * 10]
    guard = _guard(clock, usd_per_day=1.0, usd_per_month=1.5)
    await guard.settle("team-a", await guard.reserve("team-a", 0.9), 0.9, 0)
    clock[0] = NOON
    await guard.settle("team-a", await guard.reserve("team-a", 0.5), 0.5, 0)
    with pytest.raises(InsufficientQuota, match=r"usd_per_month.*resets at 2027-01-01"):
        await guard.reserve("team-a", 0.2)


async def test_request_rate_limit_counts_a_minute_and_says_when_to_retry() -> None:
    """The (n+1)th request in a UTC minute is refused with Retry-After = rest of the minute;
    the next minute starts afresh; other tenants are not affected."""
    clock = [NOON]
    guard = _guard(clock, requests_per_minute=2)
    await guard.admit("team-a")
    await guard.admit("team-a")
    with pytest.raises(RateLimitExceeded, match=r"2 requests per minute.*retry after 30 s") as e:
        await guard.admit("team-a")
    assert e.value.retry_after_s == 30
    await guard.admit("someone-else")  # budgets.default: no limit
    clock[0] += 30
    await guard.admit("team-a")


async def test_token_rate_limit_counts_settled_tokens() -> None:
    """Tokens count once settled; at the limit the next request is refused."""
    clock = [NOON]
    guard = _guard(clock, tokens_per_minute=100)
    await guard.admit("team-a")
    await guard.settle("team-a", 0, 0.0, 100)
    with pytest.raises(RateLimitExceeded, match="tokens_per_minute"):
        await guard.admit("team-a")


def test_token_file_names_tenants(tmp_path: Path) -> None:
    """`NAME TOKEN` lines name the tenant; bare tokens get a stable anonymous name; env tokens
    too; an unknown token has no tenant."""
    users = tmp_path / "tokens"
    users.write_text("# tenants\nteam-a tok-a1\nteam-a tok-a2\n\nbare-token\n")
    tokens = TokenSet.from_settings(AuthSettings(tokens=["env-tok"], tokens_file=users))
    assert tokens.tenant("tok-a1") == tokens.tenant("tok-a2") == "team-a"
    bare = tokens.tenant("bare-token")
    assert bare is not None and bare.startswith("token-") and len(bare) == 14
    assert bare == TokenSet.of(user=["bare-token"]).tenant("bare-token")
    assert tokens.tenant("env-tok") is not None
    assert tokens.tenant("nope") is None
    assert tokens.role("tok-a1") == "user"
    assert tokens.tenant_names() == {"team-a"}


def test_bad_token_line_names_file_and_line(tmp_path: Path) -> None:
    """Three fields, or a name with odd characters, is a ConfigError naming file:line."""
    users = tmp_path / "tokens"
    users.write_text("ok-token\nteam a tok\n")
    with pytest.raises(ConfigError, match=r"auth.tokens_file: .*tokens:2: expected `TOKEN` or"):
        TokenSet.from_settings(AuthSettings(tokens_file=users))
    users.write_text("te@m tok\n")
    with pytest.raises(ConfigError, match=r"tokens:1"):
        TokenSet.from_settings(AuthSettings(tokens_file=users))


def test_budget_for_an_unknown_tenant_and_bad_limits_are_config_errors(tmp_path: Path) -> None:
    """A budget for a name no token has is refused naming the field; so is a negative limit
    or an unknown key (from the YAML file, naming it)."""
    guard = _guard([NOON], usd_per_day=1.0)
    with pytest.raises(ConfigError, match=r"budgets.tenants: no token is named 'team-a'"):
        guard.check_names({"team-b"})
    guard.check_names({"team-a"})
    guard.check_names(None)  # auth off: nothing to check against
    config = tmp_path / "c.yaml"
    config.write_text("budgets:\n  tenants:\n    team-a: {usd_per_day: -1}\n")
    with pytest.raises(ConfigError, match=r"c.yaml: budgets.tenants.team-a.usd_per_day"):
        load_settings(config)
    config.write_text("budgets:\n  default: {usd_per_week: 3}\n")
    with pytest.raises(ConfigError, match=r"budgets.default.usd_per_week"):
        load_settings(config)


def test_stack_settings_turn_the_exact_cache_on() -> None:
    """deploy/stack.yaml, which `make serve` and `make demo` pass to the dispatcher, loads and
    turns the exact cache on (state in process, no budgets)."""
    settings = load_settings(Path(__file__).resolve().parents[2] / "deploy" / "stack.yaml")
    assert settings.cache.exact
    assert settings.state.url == ""
    assert settings.budgets.tenants == {}


def test_misspelt_keys_in_the_new_sections_are_errors(tmp_path: Path) -> None:
    """A key the cache, budgets or state sections do not have is a ConfigError naming it (a
    typo must not silently leave the cache off), and a non-positive TTL is refused."""
    config = tmp_path / "c.yaml"
    for text, field in (("cache: {exat: true}", "cache.exat"),
                        ("state: {uri: 'redis://x'}", "state.uri"),
                        ("budgets: {tenant: {}}", "budgets.tenant"),
                        ("cache: {ttl_s: 0}", "cache.ttl_s")):
        config.write_text(text + "\n")
        with pytest.raises(ConfigError, match=rf"c.yaml: {field}"):
            load_settings(config)


def test_state_url_must_be_redis() -> None:
    """state.url that is neither '' nor a Redis URL is a ConfigError naming the field (nothing
    is connected at build time: Redis may come up after the dispatcher)."""
    from semroute.dispatch.redis_state import RedisState

    with pytest.raises(ConfigError, match=r"state.url: expected redis://"):
        RedisState("http://127.0.0.1:6379")
    RedisState("redis://127.0.0.1:1/0")  # unreachable is fine until used
