"""The rules of DESIGN.md section 2, once per backend: caps, plans, budgets, periods."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest

from conftest import raw_client
from usage_guard import (
    Decision,
    InvalidUsage,
    Plan,
    UnknownPlan,
    UsageGuard,
    UsageLimitExceeded,
)
from usage_guard.calls import Calls
from usage_guard.runtime import Runtime

MakeGuard = Callable[..., UsageGuard]

PLANS = {
    "free": Plan(
        "free",
        {
            "emails": 10,
            "contacts": 10,
            "ai_tokens": 1000,
            "storage": 100,
            "import_rows": 1000,
            "lead_captures": 7,
            "enrichments": 0,
        },
    ),
    "pro": Plan("pro", {"emails": 1000, "contacts": None, "ai_tokens": 100_000}),
}
DEC_1 = datetime(2026, 12, 1, tzinfo=timezone.utc)


@pytest.fixture
def guard(make_guard: MakeGuard) -> UsageGuard:
    return make_guard(plans=PLANS, default_plan="free")


def on_same_storage(guard: UsageGuard, **options: Any) -> UsageGuard:
    """Another guard (other configuration, same prefix and clock) on the storage of ``guard``:
    what a redeploy with new plan definitions looks like."""
    runtime = Runtime(guard.catalog)
    calls = Calls(
        unavailable=runtime.unavailable,
        prefix=guard.calls.prefix,
        clock=guard.calls.clock,
        **options,
    )
    return UsageGuard(calls, runtime, guard.backend)


# -- hard and soft caps ---------------------------------------------------------------


def test_hard_cap_admits_up_to_the_limit_and_not_one_more(guard: UsageGuard) -> None:
    first = guard.consume("acme", "emails", 9)
    assert (first.allowed, first.used, first.limit, first.remaining) == (True, 9, 10, 1)
    too_much = guard.consume("acme", "emails", 2)
    assert (too_much.allowed, too_much.used, too_much.remaining) == (False, 9, 1)
    last = guard.consume("acme", "emails", 1)
    assert (last.allowed, last.used, last.remaining) == (True, 10, 0)
    assert not guard.consume("acme", "emails", 1).allowed
    assert guard.consume("acme", "emails", 0).allowed
    assert guard.usage("acme").meters["emails"].used == 10


@pytest.mark.parametrize(
    ("limit", "most_admitted"),
    [(10, 11), (7, 7), (9, 9), (19, 20), (100, 110), (1, 1), (0, 0), (2**53 - 1, 2**53 - 1)],
)
@pytest.mark.parametrize("metric", ["contacts", "lead_captures"])
def test_soft_cap_admits_110_percent_rounded_down(
    guard: UsageGuard, metric: str, limit: int, most_admitted: int
) -> None:
    guard.set_limit("acme", metric, limit)
    guard.set_limit("globex", metric, limit)
    over = guard.consume("globex", metric, most_admitted + 1) if most_admitted < 2**53 - 1 else None
    assert over is None or (not over.allowed and over.used == 0)
    admitted = guard.consume("acme", metric, most_admitted)
    assert admitted.allowed
    assert (admitted.limit, admitted.quota, admitted.remaining) == (limit, most_admitted, 0)
    denied = guard.consume("acme", metric, 1)
    assert (denied.allowed, denied.used, denied.limit) == (False, most_admitted, limit)


def test_limit_zero_denies_everything_but_nothing(guard: UsageGuard) -> None:
    denied = guard.consume("acme", "enrichments", 1)
    assert (denied.allowed, denied.used, denied.limit, denied.remaining) == (False, 0, 0, 0)
    assert guard.consume("acme", "enrichments", 0).allowed
    guard.set_limit("acme", "storage", 0)
    guard.set_usage("acme", "storage", 1)
    assert not guard.consume("acme", "storage", 0).allowed


def test_amount_zero_is_denied_once_usage_is_over_the_cap(guard: UsageGuard) -> None:
    guard.set_usage("acme", "contacts", 12)  # unchecked: over the 11 a soft limit of 10 admits
    for decision in (guard.consume("acme", "contacts", 0), guard.check("acme", "contacts", 0)):
        assert (decision.allowed, decision.used, decision.remaining) == (False, 12, 0)


def test_null_limit_admits_everything_and_still_counts(guard: UsageGuard) -> None:
    guard.assign_plan("acme", "pro")
    decision = guard.consume("acme", "contacts", 2**53 - 1)
    assert decision.allowed and decision.used == 2**53 - 1
    assert (decision.limit, decision.quota, decision.remaining) == (None, None, None)
    assert guard.usage("acme").meters["contacts"].used == 2**53 - 1


def test_a_denial_past_2_53_minus_1_reports_the_counter_exactly(guard: UsageGuard) -> None:
    guard.consume("acme", "emails", 4)
    # 4 + 2**53 - 1 has no exact double: the script reports the counter as Redis holds it.
    denied = guard.consume("acme", "emails", 2**53 - 1, user="alice")
    assert (denied.allowed, denied.scope, denied.used) == (False, "organization", 4)
    assert guard.usage("acme").meters["emails"].used == 4


def test_an_unlimited_meter_never_denies_even_past_2_53_minus_1(guard: UsageGuard) -> None:
    guard.consume("acme", "api_calls", 4)
    admitted = guard.consume("acme", "api_calls", 2**53 - 1)
    assert admitted.allowed and admitted.limit is None and admitted.remaining is None
    # Redis counts exactly (64-bit integers); read back, the counter is exact.
    assert guard.usage("acme").meters["api_calls"].used == 2**53 + 3


def test_a_metric_the_plan_leaves_out_is_unlimited_and_counted(guard: UsageGuard) -> None:
    decision = guard.consume("acme", "api_calls", 5_000_000)
    assert decision.allowed and decision.limit is None and decision.used == 5_000_000
    assert guard.usage("acme").meters["api_calls"].used == 5_000_000


def test_without_a_default_plan_only_overrides_deny(make_guard: MakeGuard) -> None:
    guard = make_guard(plans=PLANS)
    assert guard.consume("acme", "emails", 10_000).allowed
    guard.set_limit("acme", "emails", 10_001)
    assert not guard.consume("acme", "emails", 2).allowed
    assert guard.consume("acme", "emails", 1).allowed
    usage = guard.usage("acme")
    assert usage.plan is None and usage.meters["emails"].used == 10_001


# -- plans and overrides --------------------------------------------------------------


def test_set_limit_overrides_the_plan_and_remove_limit_restores_it(guard: UsageGuard) -> None:
    guard.set_limit("acme", "emails", 3)
    assert guard.check("acme", "emails", 3).allowed and not guard.check("acme", "emails", 4).allowed
    guard.set_limit("acme", "emails", None)
    assert guard.check("acme", "emails", 10_000).limit is None
    guard.remove_limit("acme", "emails")
    assert guard.check("acme", "emails", 1).limit == 10


def test_assign_plan_switches_limits_and_clears_overrides(guard: UsageGuard) -> None:
    guard.set_limit("acme", "emails", 3)
    guard.assign_plan("acme", "pro")
    assert guard.check("acme", "emails").limit == 1000
    guard.set_limit("acme", "emails", 3)
    guard.assign_plan("acme", "pro")
    assert guard.check("acme", "emails").limit == 1000
    assert guard.usage("acme").plan == "pro"
    guard.assign_plan("acme", None)
    assert guard.check("acme", "emails").limit == 10 and guard.usage("acme").plan == "free"


def test_an_unknown_plan_is_refused_and_nothing_changes(guard: UsageGuard) -> None:
    with pytest.raises(UnknownPlan) as raised:
        guard.assign_plan("acme", "gold")
    assert isinstance(raised.value, ValueError)
    assert guard.usage("acme").plan == "free"


def test_an_assigned_plan_no_longer_configured_falls_back_to_the_default(
    guard: UsageGuard, caplog: pytest.LogCaptureFixture
) -> None:
    guard.assign_plan("acme", "pro")
    redeployed = on_same_storage(guard, plans={"free": PLANS["free"]}, default_plan="free")
    with caplog.at_level(logging.WARNING, logger="usage_guard"):
        decision = redeployed.consume("acme", "emails", 11)
    assert not decision.allowed and decision.limit == 10
    assert any("'pro'" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert redeployed.usage("acme").plan == "free"


def test_a_changed_plan_definition_applies_without_rewriting_redis(guard: UsageGuard) -> None:
    guard.assign_plan("acme", "pro")
    assert guard.consume("acme", "emails", 1000).allowed
    org_hash = raw_client(guard).hgetall(f"{guard.calls.prefix}:{{acme}}:org")
    bigger_pro = {**PLANS, "pro": Plan("pro", {"emails": 1500})}
    redeployed = on_same_storage(guard, plans=bigger_pro, default_plan="free")
    decision = redeployed.consume("acme", "emails", 500)
    assert (decision.allowed, decision.used, decision.limit) == (True, 1500, 1500)
    assert raw_client(guard).hgetall(f"{guard.calls.prefix}:{{acme}}:org") == org_hash


# -- check, amount 0 and Decision fields ----------------------------------------------


def test_check_takes_the_consume_decision_and_counts_nothing(guard: UsageGuard) -> None:
    guard.consume("acme", "emails", 6)
    for amount in (0, 3, 4, 5, 10):
        checked = guard.check("acme", "emails", amount)
        admitted = amount <= 4
        assert checked.allowed == admitted
        # Usage as consume() would report it: with the amount when admitted.
        assert checked.used == 6 + amount if admitted else checked.used == 6
    assert guard.usage("acme").meters["emails"].used == 6
    denied_check = guard.check("acme", "emails", 5)
    assert guard.consume("acme", "emails", 5) == denied_check
    admitted_check = guard.check("acme", "emails", 4)
    assert guard.consume("acme", "emails", 4) == admitted_check


def test_check_and_consume_agree_on_personal_budgets_and_several_metrics(
    guard: UsageGuard,
) -> None:
    guard.set_budget("acme", "alice", "ai_tokens", 50)
    guard.consume("acme", "ai_tokens", 20, user="alice")
    for amount in (10, 30, 31):
        checked = guard.check("acme", "ai_tokens", amount, user="alice")
        assert guard.consume("acme", "ai_tokens", amount, user="alice") == checked
    both = {"emails": 2, "ai_tokens": 1}
    checked = guard.check("acme", both, user="alice")
    assert guard.consume("acme", both, user="alice") == checked


def test_amount_zero_reads_current_usage(guard: UsageGuard) -> None:
    guard.consume("acme", "emails", 4)
    decision = guard.consume("acme", "emails", 0)
    assert (decision.allowed, decision.used, decision.remaining) == (True, 4, 6)
    assert guard.check("acme", "emails", 0) == decision


def test_decision_fields_of_an_admitted_call(guard: UsageGuard) -> None:
    decision = guard.consume("acme", {"emails": 3, "contacts": 2})
    assert decision == Decision(
        allowed=True,
        metric="emails",
        scope="organization",
        used=3,
        limit=10,
        remaining=7,
        resets_at=DEC_1,
        quota=10,
        requested=3,
        # Every other metric of the call, for the response's fields.
        others=(
            Decision(
                allowed=True,
                metric="contacts",
                scope="organization",
                used=2,
                limit=10,
                remaining=9,
                resets_at=None,
                quota=11,
                requested=2,
            ),
        ),
    )
    assert decision.raise_for_status() is decision
    assert guard.consume("acme", {"contacts": 1, "emails": 1}).resets_at is None


def test_decision_fields_of_a_denied_call(guard: UsageGuard) -> None:
    guard.consume("acme", "contacts", 10)
    decision = guard.consume("acme", {"emails": 3, "contacts": 2})
    assert decision == Decision(
        allowed=False,
        metric="contacts",
        scope="organization",
        used=10,
        limit=10,
        remaining=1,
        resets_at=None,
        quota=11,
        requested=2,  # of the denying metric
    )
    assert not decision
    with pytest.raises(UsageLimitExceeded) as raised:
        decision.raise_for_status()
    assert raised.value.decision is decision


# -- multi-metric consumption ---------------------------------------------------------


def test_several_metrics_are_counted_all_or_nothing(guard: UsageGuard) -> None:
    guard.set_limit("acme", "contacts", 600)  # soft: 660 admitted
    assert guard.consume("acme", {"import_rows": 500, "contacts": 500}).allowed
    denied = guard.consume("acme", {"import_rows": 500, "contacts": 500})
    assert (denied.allowed, denied.metric, denied.used) == (False, "contacts", 500)
    denied_first = guard.consume("acme", {"import_rows": 501, "contacts": 1})
    assert (denied_first.allowed, denied_first.metric) == (False, "import_rows")
    meters = guard.usage("acme").meters
    assert (meters["import_rows"].used, meters["contacts"].used) == (500, 500)
    assert guard.consume("acme", {"import_rows": 500, "contacts": 160}).allowed


# -- personal budgets -----------------------------------------------------------------


def test_a_personal_budget_is_checked_first_and_names_the_scope(guard: UsageGuard) -> None:
    guard.set_budget("acme", "alice", "ai_tokens", 100)
    admitted = guard.consume("acme", "ai_tokens", 100, user="alice")
    assert (admitted.allowed, admitted.scope, admitted.used, admitted.limit) == (
        True,
        "personal",
        100,
        100,
    )
    assert admitted.remaining == 0
    both_deny = guard.consume("acme", "ai_tokens", 5000, user="alice")
    assert (both_deny.allowed, both_deny.scope, both_deny.used) == (False, "personal", 100)
    bob = guard.consume("acme", "ai_tokens", 850, user="bob")
    assert (bob.allowed, bob.scope, bob.used, bob.remaining) == (True, "organization", 950, 50)


def test_a_personal_consumption_must_also_fit_the_org(guard: UsageGuard) -> None:
    guard.set_budget("acme", "alice", "ai_tokens", 900)
    guard.consume("acme", "ai_tokens", 700, user="bob")
    denied = guard.consume("acme", "ai_tokens", 400, user="alice")
    assert (denied.allowed, denied.scope, denied.used, denied.limit) == (
        False,
        "organization",
        700,
        1000,
    )
    # The org leaves 300, the budget 900: the binding budget of the admitted call is the org's.
    admitted = guard.consume("acme", "ai_tokens", 100, user="alice")
    assert (admitted.scope, admitted.used, admitted.remaining) == ("organization", 800, 200)


def test_personal_consumption_is_counted_with_or_without_a_budget(guard: UsageGuard) -> None:
    guard.set_budget("acme", "alice", "ai_tokens", 500)
    guard.consume("acme", "ai_tokens", 30, user="alice")
    guard.consume("acme", "ai_tokens", 20, user="bob")
    guard.consume("acme", "ai_tokens", 7)
    guard.consume("acme", "enrichments", 0, user="bob")
    alice, bob = guard.usage("acme", user="alice"), guard.usage("acme", user="bob")
    assert alice.personal["ai_tokens"].used == 30 and alice.personal["ai_tokens"].budget == 500
    assert bob.personal["ai_tokens"].used == 20 and bob.personal["ai_tokens"].budget is None
    assert set(bob.personal) == {"ai_tokens", "enrichments"}
    assert guard.usage("acme").meters["ai_tokens"].used == 57


def test_removing_a_budget_returns_the_user_to_the_shared_pool(guard: UsageGuard) -> None:
    guard.set_budget("acme", "alice", "ai_tokens", 10)
    assert not guard.consume("acme", "ai_tokens", 11, user="alice").allowed
    guard.set_budget("acme", "alice", "ai_tokens", None)
    decision = guard.consume("acme", "ai_tokens", 11, user="alice")
    assert (decision.allowed, decision.scope, decision.limit) == (True, "organization", 1000)
    assert guard.usage("acme", user="alice").personal["ai_tokens"].budget is None


def test_a_zero_budget_denies_that_user_only(guard: UsageGuard) -> None:
    guard.assign_plan("acme", "pro")
    guard.set_budget("acme", "alice", "enrichments", 0)
    denied = guard.consume("acme", "enrichments", 1, user="alice")
    assert (denied.allowed, denied.scope, denied.limit, denied.remaining) == (
        False,
        "personal",
        0,
        0,
    )
    assert guard.consume("acme", "enrichments", 1, user="bob").allowed


def test_budgets_only_exist_on_personal_metrics(guard: UsageGuard) -> None:
    with pytest.raises(InvalidUsage):
        guard.set_budget("acme", "alice", "emails", 10)
    # A user consuming a non-personal metric draws on the org limit only.
    decision = guard.consume("acme", "emails", 10, user="alice")
    assert (decision.allowed, decision.scope, decision.used) == (True, "organization", 10)


def test_budgets_are_per_user_and_per_org(guard: UsageGuard) -> None:
    guard.set_budget("acme", "alice", "ai_tokens", 5)
    assert guard.consume("globex", "ai_tokens", 50, user="alice").scope == "organization"
    assert guard.consume("acme", "enrichments", 0, user="alice").scope == "organization"


# -- periods: monthly and cumulative metrics ------------------------------------------


def test_monthly_counters_reset_at_midnight_utc_on_the_first(guard: Any, clock: Any) -> None:
    clock.set(2026, 11, 30, 23, 59, 59, 999999)
    full = guard.consume("acme", "emails", 10)
    assert full.allowed and full.resets_at == DEC_1
    assert not guard.consume("acme", "emails", 1).allowed
    clock.set(2026, 12, 1)
    fresh = guard.consume("acme", "emails", 1)
    assert (fresh.allowed, fresh.used) == (True, 1)
    assert fresh.resets_at == datetime(2027, 1, 1, tzinfo=timezone.utc)


def test_prepared_consumptions_follow_the_month_and_a_full_cache(
    guard: Any, clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A one-metric consume reuses its keys and arguments per (org, metric, user) and month.
    monkeypatch.setattr("usage_guard.calls.PREPARED_SIZE", 2)
    for month in (11, 12):
        clock.set(2026, month, 15)
        for org in ("acme", "globex", "initech"):  # three entries: the cache starts afresh
            for user in (None, "alice"):
                assert guard.consume(org, "ai_tokens", 10, user=user).allowed
            assert guard.consume(org, "ai_tokens", 5, user="alice").used == 25
            assert guard.usage(org).meters["ai_tokens"].used == 25
            assert guard.usage(org, "alice").personal["ai_tokens"].used == 15


def test_cumulative_metrics_never_reset(guard: Any, clock: Any) -> None:
    clock.set(2026, 11, 30, 23, 59, 59, 999999)
    guard.consume("acme", "contacts", 8)
    clock.set(2027, 2, 1)
    decision = guard.consume("acme", "contacts", 3)
    assert (decision.allowed, decision.used, decision.resets_at) == (True, 11, None)


def test_release_never_goes_below_zero_and_set_usage_reconciles(guard: UsageGuard) -> None:
    guard.consume("acme", "storage", 60)
    guard.release("acme", "storage", 15)
    assert guard.check("acme", "storage", 0).used == 45
    guard.release("acme", "storage", 1000)
    assert guard.check("acme", "storage", 0).used == 0
    guard.set_usage("acme", "storage", 250)  # unchecked, even past the limit
    assert guard.check("acme", "storage", 0).used == 250
    assert not guard.consume("acme", "storage", 0).allowed
    guard.set_usage("acme", "storage", 40)
    guard.release("acme", {"storage": 10, "contacts": 3})
    meters = guard.usage("acme").meters
    assert (meters["storage"].used, meters["contacts"].used) == (30, 0)


@pytest.mark.parametrize("operation", ["release", "set_usage"])
def test_release_and_set_usage_refuse_monthly_metrics(guard: UsageGuard, operation: str) -> None:
    guard.consume("acme", "emails", 4)
    with pytest.raises(InvalidUsage):
        getattr(guard, operation)("acme", "emails", 1)
    if operation == "release":
        with pytest.raises(InvalidUsage):
            guard.release("acme", {"storage": 1, "emails": 1})
    meters = guard.usage("acme").meters
    assert (meters["emails"].used, meters["storage"].used) == (4, 0)


def test_history_shows_totals_and_carries_cumulative_values_forward(guard: Any, clock: Any) -> None:
    clock.set(2026, 7, 10)
    guard.set_usage("acme", "contacts", 5)
    guard.consume("acme", "emails", 2)
    clock.set(2026, 9, 30, 23, 59, 59)
    guard.set_usage("acme", "contacts", 8)
    clock.set(2026, 10, 3)
    guard.consume("acme", "emails", 3)
    clock.set(2026, 11, 15)
    guard.consume("acme", "emails", 1)
    usage = guard.usage("acme")
    assert [p.key for p in usage.periods] == [
        "2026-06",
        "2026-07",
        "2026-08",
        "2026-09",
        "2026-10",
        "2026-11",
    ]
    assert usage.meters["contacts"].history == (0, 5, 5, 8, 8, 8)
    assert usage.meters["emails"].history == (0, 2, 0, 0, 3, 1)
    assert usage.meters["emails"].used == 1
    clock.set(2027, 1, 2)
    later = guard.usage("acme")
    assert later.meters["contacts"].history == (5, 8, 8, 8, 8, 8)
    assert later.meters["emails"].history == (0, 0, 3, 1, 0, 0)


# -- idempotency ----------------------------------------------------------------------


def test_an_admitted_retry_returns_the_original_decision(guard: UsageGuard) -> None:
    original = guard.consume("acme", "emails", 3, idempotency_key="order-1")
    retry = guard.consume("acme", "emails", 3, idempotency_key="order-1")
    assert retry.replayed and not original.replayed
    assert retry == Decision(**{**_fields(original), "replayed": True})
    other = guard.consume("acme", {"ai_tokens": 50, "emails": 7}, idempotency_key="order-1")
    assert other.replayed and (other.metric, other.used) == ("emails", 3)
    meters = guard.usage("acme").meters
    assert (meters["emails"].used, meters["ai_tokens"].used) == (3, 0)


def test_a_denied_consumption_is_not_remembered(guard: UsageGuard) -> None:
    guard.set_limit("acme", "emails", 0)
    assert not guard.consume("acme", "emails", 2, idempotency_key="order-2").allowed
    guard.remove_limit("acme", "emails")
    retry = guard.consume("acme", "emails", 2, idempotency_key="order-2")
    assert (retry.allowed, retry.replayed, retry.used) == (True, False, 2)


def test_idempotency_keys_are_scoped_to_the_org(guard: UsageGuard) -> None:
    guard.consume("acme", "emails", 1, idempotency_key="same")
    other_org = guard.consume("globex", "emails", 1, idempotency_key="same")
    assert not other_org.replayed and other_org.used == 1


def _fields(decision: Decision) -> dict[str, Any]:
    return {name: getattr(decision, name) for name in Decision.__dataclass_fields__}
