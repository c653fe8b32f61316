"""Reservations expire: an estimate left open is refunded at its deadline by the next
script call on the org, whichever it is; a late settle counts once, a late cancel nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

import usage_guard
from conftest import raw_client
from usage_guard import InvalidUsage, Plan, UsageGuard
from usage_guard.keys import KeySpace

MakeGuard = Callable[..., UsageGuard]
PLANS = {"free": Plan("free", {"ai_tokens": 1000, "emails": 10, "contacts": 10})}


@pytest.fixture
def guard(make_guard: MakeGuard) -> UsageGuard:
    return make_guard(plans=PLANS, default_plan="free")


def used(guard: UsageGuard, metric: str, org: str = "acme") -> int:
    return guard.usage(org).meters[metric].used


def held(guard: UsageGuard, org: str = "acme") -> dict[str, str]:
    return raw_client(guard).hgetall(KeySpace(guard.calls.prefix, org).held)  # type: ignore[no-any-return]


def open_entries(guard: UsageGuard, org: str = "acme") -> int:
    return raw_client(guard).zcard(KeySpace(guard.calls.prefix, org).reservations)  # type: ignore[no-any-return]


def test_an_estimate_left_open_stops_counting_at_its_deadline(
    guard: UsageGuard, clock: Any
) -> None:
    crashed = guard.reserve("acme", "ai_tokens", 900, user="alice")  # its worker dies
    assert not guard.check("acme", "ai_tokens", 200).allowed
    clock.advance(seconds=899)
    assert crashed.open and not guard.check("acme", "ai_tokens", 200).allowed
    clock.advance(seconds=1)
    assert not crashed.open
    assert crashed.expires_at == clock() and crashed.ticket.deadline % 1000 == 0
    assert guard.consume("acme", "ai_tokens", 1000).allowed
    assert used(guard, "ai_tokens") == 1000
    assert held(guard) == {} and open_entries(guard) == 0


SWEEPING_CALLS: dict[str, Callable[[UsageGuard], object]] = {
    "consume": lambda g: g.consume("acme", "emails", 1),
    "check": lambda g: g.check("acme", "emails"),
    "idempotent consume": lambda g: g.consume("acme", "emails", idempotency_key="k"),
    "reserve": lambda g: g.reserve("acme", "emails", 1000),  # denied: it holds nothing
    "usage": lambda g: g.usage("acme"),
    "report": lambda g: g.report("acme", user="alice"),
    "assign_plan": lambda g: g.assign_plan("acme", "free"),
    "set_limit": lambda g: g.set_limit("acme", "emails", 20),
    "remove_limit": lambda g: g.remove_limit("acme", "emails"),
    "set_budget": lambda g: g.set_budget("acme", "bob", "ai_tokens", 5),
    "release": lambda g: g.release("acme", "contacts", 1),
    "set_usage": lambda g: g.set_usage("acme", "contacts", 3),
}


@pytest.mark.parametrize("call", SWEEPING_CALLS, ids=list(SWEEPING_CALLS))
def test_every_script_call_on_the_org_refunds_what_has_expired(
    guard: UsageGuard, clock: Any, call: str
) -> None:
    guard.reserve("acme", {"ai_tokens": 400, "contacts": 4}, user="alice", ttl=60)
    still_open = guard.reserve("acme", "ai_tokens", 100, ttl=120)
    guard.reserve("globex", "ai_tokens", 50, ttl=30)
    clock.advance(seconds=60)
    assert len(held(guard)) == 3  # nothing is swept until a call comes
    SWEEPING_CALLS[call](guard)
    assert held(guard) == {f"m:{clock():%Y-%m}:ai_tokens": "100"}
    assert still_open.open and open_entries(guard) == 1
    assert len(held(guard, "globex")) == 1  # another org's call sweeps its own only


def test_reads_never_count_an_expired_estimate(guard: UsageGuard, clock: Any) -> None:
    guard.reserve("acme", "ai_tokens", 300, user="alice", ttl=10)
    guard.reserve("acme", "contacts", 6, ttl=10)
    mine = guard.usage("acme", user="alice")
    assert mine.meters["ai_tokens"].used == mine.personal["ai_tokens"].used == 300
    assert mine.meters["contacts"].used == 6
    clock.advance(seconds=10)
    mine = guard.usage("acme", user="alice")
    assert mine.meters["ai_tokens"].used == mine.personal["ai_tokens"].used == 0
    assert mine.meters["contacts"].used == 0
    assert guard.report("acme").to_dict()["meters"][0]["used"] == 0


def test_settling_after_expiry_counts_the_actual_amount_once_never_denied(
    guard: UsageGuard, clock: Any
) -> None:
    late = guard.reserve("acme", "ai_tokens", 500, user="alice", ttl=60)
    clock.advance(minutes=5)
    assert guard.consume("acme", "ai_tokens", 900).allowed  # the estimate was refunded
    assert late.settle(700) is True  # recorded although it takes the org past its cap
    assert late.settle(700) is False and late.cancel() is False
    usage = guard.usage("acme", user="alice")
    assert usage.meters["ai_tokens"].used == 1600
    assert usage.personal["ai_tokens"].used == 700


def test_settling_after_expiry_before_any_sweep_counts_once(guard: UsageGuard, clock: Any) -> None:
    late = guard.reserve("acme", "emails", 8, ttl=60)
    clock.advance(seconds=61)
    assert late.settle(3) is True  # the settle's own call sweeps first
    assert used(guard, "emails") == 3 and held(guard) == {}


def test_cancelling_after_expiry_does_nothing(guard: UsageGuard, clock: Any) -> None:
    guard.consume("acme", "emails", 2)
    swept = guard.reserve("acme", "emails", 5, ttl=30)
    unswept = guard.reserve("acme", "emails", 3, ttl=30)
    clock.advance(seconds=30)
    guard.check("acme", "emails")
    assert swept.cancel() is False
    assert unswept.cancel() is False
    assert used(guard, "emails") == 2
    assert unswept.settle(1) is False  # cancelled: a settle after it counts nothing


def test_a_late_settle_of_an_earlier_month_counts_in_that_month(
    guard: UsageGuard, clock: Any
) -> None:
    clock.set(2026, 11, 30, 23, 50)
    november = guard.reserve("acme", "emails", 4, ttl=60)
    clock.set(2026, 12, 2)
    assert november.settle(6) is True
    assert guard.usage("acme").meters["emails"].history[-2:] == (6, 0)


def test_the_default_ttl_is_the_guards_and_reserve_can_set_its_own(
    make_guard: MakeGuard, clock: Any
) -> None:
    guard = make_guard(plans=PLANS, default_plan="free", reservation_ttl=90)
    default = guard.reserve("acme", "emails", 1)
    longer = guard.reserve("acme", "emails", 1, ttl=2.5 * 3600)
    assert default.expires_at == clock() + timedelta(seconds=90)
    assert longer.expires_at == clock() + timedelta(hours=2.5)
    assert make_guard(plans=PLANS).calls.reservation_ttl == 900  # 15 minutes


@pytest.mark.parametrize("bad", [0, -1, 31 * 86400 + 1, float("nan"), float("inf"), True, "60"])
def test_a_bad_ttl_is_refused_before_redis(
    guard: UsageGuard, make_guard: MakeGuard, bad: Any
) -> None:
    with pytest.raises(InvalidUsage, match="ttl"):
        guard.reserve("acme", "emails", 1, ttl=bad)
    with pytest.raises(InvalidUsage, match="reservation_ttl"):
        make_guard(reservation_ttl=bad)
    assert open_entries(guard) == 0


def test_an_expired_reservation_refunded_never_recreates_a_counter(
    guard: UsageGuard, clock: Any
) -> None:
    reservation = guard.reserve("acme", {"emails": 3, "contacts": 2}, ttl=10)
    clock.advance(seconds=11)
    guard.check("acme", "emails")
    assert reservation.cancel() is False
    prefix = f"{guard.calls.prefix}:{{acme}}:"
    assert not [k for k in raw_client(guard).scan_iter(f"{prefix}*") if ":r:" not in k]


def test_releasing_a_meter_that_is_gone_never_recreates_it(guard: UsageGuard) -> None:
    guard.release("acme", "contacts", 5)
    assert not list(raw_client(guard).scan_iter(f"{guard.calls.prefix}:*"))


def test_the_keys_of_open_reservations_outlive_the_last_deadline(
    make_guard: MakeGuard, clock: Any
) -> None:
    guard = make_guard(plans=PLANS, history_months=1)
    clock.set(2026, 11, 30, 23, 59)  # this month's keys expire in 60 s
    first = guard.reserve("acme", "emails", 1, ttl=3600)
    second = guard.reserve("acme", "emails", 1, ttl=600)
    space = KeySpace(guard.calls.prefix, "acme")
    client = raw_client(guard)
    for key in (space.reservations, space.held, space.reservation(first.ticket.id)):
        assert 3600 - 5 <= client.ttl(key) <= 3600, key
    assert 600 - 5 <= client.ttl(space.reservation(second.ticket.id)) <= 600


def test_async_reservations_expire_too(guard: UsageGuard, clock: Any) -> None:
    async def scenario() -> None:
        aio = guard.aio
        reservation = await aio.reserve("acme", "ai_tokens", 1000, ttl=5)
        assert not (await aio.check("acme", "ai_tokens")).allowed
        clock.advance(seconds=5)
        assert not reservation.open
        assert (await aio.consume("acme", "ai_tokens", 1000)).allowed
        assert await reservation.settle(10) is True
        assert await reservation.cancel() is False
        await aio.aclose()

    asyncio.run(scenario())
    assert used(guard, "ai_tokens") == 1010


# -- found by attacking the sweep: sums past what a double or Redis can hold ------------


def test_a_reservation_that_cannot_be_held_holds_nothing(guard: UsageGuard) -> None:
    space = KeySpace(guard.calls.prefix, "acme")
    near_the_top = str(2**63 - 1000)  # what open reservations of an unlimited meter hold
    raw_client(guard).hset(space.held, "m:2026-11:import_rows", near_the_top)
    with pytest.raises(Exception, match="overflow"):  # the tests re-raise unexpected errors
        guard.reserve("acme", {"ai_tokens": 900, "import_rows": 5000})
    assert held(guard) == {"m:2026-11:import_rows": near_the_top}
    assert open_entries(guard) == 0
    assert guard.consume("acme", "ai_tokens", 1000).allowed


def test_usage_adds_held_estimates_exactly_past_two_to_the_53(guard: UsageGuard) -> None:
    november = KeySpace(guard.calls.prefix, "acme").meters("2026-11")
    raw_client(guard).hset(november, "import_rows", str(2**53 + 1))
    guard.reserve("acme", "import_rows", 1)
    assert guard.usage("acme").meters["import_rows"].used == 2**53 + 2


def test_a_decision_past_two_to_the_63_reports_at_most_two_to_the_53(guard: UsageGuard) -> None:
    november = KeySpace(guard.calls.prefix, "acme").meters("2026-11")
    raw_client(guard).hset(november, "import_rows", str(2**63 - 1000))
    decision = guard.reserve("acme", "import_rows", 2**53 - 1).decision
    assert decision.allowed and decision.used == 2**53 - 1


def test_metered_cost_takes_the_reservation_ttl(guard: UsageGuard, clock: Any) -> None:
    @guard.metered("ai_tokens", 900, cost=lambda reply: len(reply), ttl=3600)
    def slow_completion() -> str:
        clock.advance(minutes=30)  # past the guard's 15 minutes, within the call's hour
        assert not guard.check("acme", "ai_tokens", 200).allowed  # still held
        return "x" * 700

    with usage_guard.subject("acme", guard=guard):
        assert slow_completion() == "x" * 700
    assert used(guard, "ai_tokens") == 700
    with pytest.raises(InvalidUsage, match="cost"):
        guard.metered("ai_tokens", ttl=60)
    with pytest.raises(InvalidUsage, match="ttl"):
        guard.metered("ai_tokens", cost=len, ttl=0)
