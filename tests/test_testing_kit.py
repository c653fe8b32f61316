"""The test kit an application's own tests use: the pytest plugin, its clock, reset."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from usage_guard import InvalidUsage, Plan, UsageGuard
from usage_guard.testing import ManualClock, UsageGuardKit

README = Path(__file__).resolve().parents[1] / "README.md"
PLANS = {"free": Plan("free", {"emails": 100, "ai_tokens": 1_000})}


def test_the_readme_example_passes_as_a_users_test_suite(pytester: pytest.Pytester) -> None:
    """The plugin comes with the package (its entry point): the README's conftest.py
    and test, pasted into a project of their own, pass."""
    section = README.read_text(encoding="utf-8").split("## Testing your application")[1]
    example = re.search(r"```python\n(.*?)```", section, re.S)
    assert example is not None
    conftest, test = example.group(1).split("# test_usage.py\n")
    pytester.makeconftest(conftest)
    pytester.makepyfile(test_usage=test)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_the_clock_follows_real_time_until_stopped() -> None:
    clock = ManualClock()
    assert abs(clock() - datetime.now(timezone.utc)) < timedelta(seconds=5)
    assert clock.set(2026, 12, 1) == datetime(2026, 12, 1, tzinfo=timezone.utc)
    assert clock.advance(hours=1, minutes=30) == datetime(2026, 12, 1, 1, 30, tzinfo=timezone.utc)
    assert clock() == datetime(2026, 12, 1, 1, 30, tzinfo=timezone.utc)  # stays there
    with pytest.raises(InvalidUsage):
        clock.freeze(datetime(2026, 12, 1))  # naive


def test_reset_forgets_an_org_and_only_it() -> None:
    kit = UsageGuardKit(
        plans={**PLANS, "pro": Plan("pro", {"emails": 10_000})}, default_plan="free"
    )
    guard = kit.guard
    guard.assign_plan("acme", "pro")
    guard.set_budget("acme", "alice", "ai_tokens", 10)
    guard.consume("acme", {"emails": 500, "ai_tokens": 5}, user="alice")
    guard.set_usage("acme", "contacts", 7)
    guard.reserve("acme", "emails", 3)
    guard.consume("globex", "emails", 2)
    kit.reset("acme")
    usage = guard.usage("acme", "alice")
    assert usage.plan == "free" and usage.personal["ai_tokens"].budget is None
    assert {name: m.used for name, m in usage.meters.items() if m.used} == {}
    assert not guard.consume("acme", "emails", 101).allowed  # free's cap, learnt again
    assert guard.usage("globex").meters["emails"].used == 2
    kit.close()


def test_set_usage_sets_org_personal_and_cumulative_meters() -> None:
    kit = UsageGuardKit(plans=PLANS, default_plan="free")
    kit.clock.set(2026, 11, 15)
    kit.set_usage("acme", "emails", 95)
    kit.set_usage("acme", "ai_tokens", 40, user="alice")
    kit.set_usage("acme", "storage", 1_000)
    usage = kit.guard.usage("acme", "alice")
    assert usage.meters["emails"].used == 95 and usage.meters["storage"].used == 1_000
    assert usage.personal["ai_tokens"].used == 40
    assert kit.guard.consume("acme", "emails", 5).allowed
    assert not kit.guard.consume("acme", "emails").allowed
    for metric, value, user in (
        ("emails", 1, "alice"),  # not a personal metric
        ("storage", 1, "alice"),  # cumulative: no personal counts
        ("emails", -1, None),
    ):
        with pytest.raises(InvalidUsage):
            kit.set_usage("acme", metric, value, user=user)
    kit.close()


def test_the_app_under_test_shares_the_kits_server_and_clock() -> None:
    kit = UsageGuardKit(plans=PLANS, default_plan="free")
    app_guard = UsageGuard.from_url(kit.url, clock=kit.clock, plans=PLANS, default_plan="free")
    kit.clock.set(2026, 11, 30, 23)
    kit.set_usage("acme", "emails", 100)
    assert not app_guard.consume("acme", "emails").allowed
    kit.clock.advance(hours=1)
    assert app_guard.consume("acme", "emails").allowed  # December
    app_guard.close()
    kit.close()
