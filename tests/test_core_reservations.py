"""Reservations: reserve an estimate, then settle the actual amount or cancel."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

import usage_guard
from conftest import raw_client
from usage_guard import (
    AsyncReservation,
    InvalidAmount,
    InvalidUsage,
    Plan,
    Reservation,
    UsageGuard,
    metered,
)

MakeGuard = Callable[..., UsageGuard]
PLANS = {"free": Plan("free", {"ai_tokens": 1000, "emails": 10, "contacts": 10})}


@pytest.fixture
def guard(make_guard: MakeGuard) -> UsageGuard:
    return make_guard(plans=PLANS, default_plan="free")


def used(guard: UsageGuard, metric: str, org: str = "acme") -> int:
    return guard.usage(org).meters[metric].used


def test_a_reservation_is_checked_and_counted_like_a_consumption(guard: UsageGuard) -> None:
    reservation = guard.reserve("acme", "ai_tokens", 400)
    decision = reservation.decision
    assert (decision.allowed, decision.used, decision.remaining) == (True, 400, 600)
    assert used(guard, "ai_tokens") == 400
    assert not guard.check("acme", "ai_tokens", 601).allowed


def test_settle_adjusts_by_the_difference_and_is_done_once(guard: UsageGuard) -> None:
    reservation = guard.reserve("acme", "ai_tokens", 400)
    guard.consume("acme", "ai_tokens", 100)
    assert reservation.settle(300) is True
    assert used(guard, "ai_tokens") == 400
    assert reservation.settle(350) is False
    assert reservation.cancel() is False
    assert used(guard, "ai_tokens") == 400


def test_settle_may_exceed_the_cap_and_is_never_denied(guard: UsageGuard) -> None:
    reservation = guard.reserve("acme", "ai_tokens", 900)
    assert reservation.settle(1500) is True
    assert used(guard, "ai_tokens") == 1500
    assert not guard.consume("acme", "ai_tokens", 0).allowed


def test_cancel_refunds_the_estimate_once(guard: UsageGuard) -> None:
    guard.consume("acme", "ai_tokens", 10)
    reservation = guard.reserve("acme", "ai_tokens", 400)
    assert reservation.cancel() is True
    assert reservation.cancel() is False
    assert reservation.settle(1) is False
    assert used(guard, "ai_tokens") == 10


def test_a_denied_reservation_counts_nothing_and_cannot_be_settled(guard: UsageGuard) -> None:
    guard.consume("acme", "ai_tokens", 700)
    reservation = guard.reserve("acme", "ai_tokens", 400)
    assert not reservation.decision.allowed and reservation.decision.used == 700
    assert reservation.settle(400) is False
    assert reservation.cancel() is False
    assert used(guard, "ai_tokens") == 700


def test_settling_after_the_month_changed_adjusts_the_reserved_period(
    guard: UsageGuard, clock: Any
) -> None:
    clock.set(2026, 11, 30, 23, 59, 59, 999999)
    november = guard.reserve("acme", "ai_tokens", 500)
    clock.set(2026, 12, 1)
    assert november.settle(800) is True
    assert guard.usage("acme").meters["ai_tokens"].history[-2:] == (800, 0)
    clock.set(2026, 12, 31, 23, 59)
    december = guard.reserve("acme", "ai_tokens", 1000)
    assert december.decision.allowed
    clock.set(2027, 1, 1)
    assert december.cancel() is True
    assert guard.usage("acme").meters["ai_tokens"].history[-3:] == (800, 0, 0)


def test_personal_reservations_count_and_settle_for_the_user(guard: UsageGuard) -> None:
    guard.set_budget("acme", "alice", "ai_tokens", 500)
    reservation = guard.reserve("acme", "ai_tokens", 400, user="alice")
    assert (reservation.decision.scope, reservation.decision.used) == ("personal", 400)
    denied = guard.reserve("acme", "ai_tokens", 200, user="alice")
    assert (denied.decision.allowed, denied.decision.scope) == (False, "personal")
    assert reservation.settle(450) is True
    assert guard.usage("acme", user="alice").personal["ai_tokens"].used == 450
    second = guard.reserve("acme", "ai_tokens", 50, user="alice")
    assert second.cancel() is True
    mine = guard.usage("acme", user="alice")
    assert (mine.personal["ai_tokens"].used, mine.meters["ai_tokens"].used) == (450, 450)


def test_a_multi_metric_reservation_settles_with_a_mapping(guard: UsageGuard) -> None:
    reservation = guard.reserve("acme", {"emails": 5, "contacts": 4})
    assert reservation.decision.allowed
    with pytest.raises(InvalidUsage):
        reservation.settle(3)
    with pytest.raises(InvalidUsage):
        reservation.settle({"emails": 3})
    assert reservation.settle({"emails": 3, "contacts": 9}) is True
    assert (used(guard, "emails"), used(guard, "contacts")) == (3, 9)


def test_an_invalid_actual_amount_leaves_the_reservation_open(guard: UsageGuard) -> None:
    reservation = guard.reserve("acme", "ai_tokens", 100)
    for bad in (-1, 1.5, True, 2**53):
        with pytest.raises(InvalidAmount):
            reservation.settle(bad)  # type: ignore[arg-type]
    assert used(guard, "ai_tokens") == 100
    assert reservation.settle(60) is True
    assert used(guard, "ai_tokens") == 60


def test_an_open_estimate_stays_apart_from_a_reconciled_cumulative_value(
    guard: UsageGuard,
) -> None:
    reservation = guard.reserve("acme", "contacts", 8)
    guard.set_usage("acme", "contacts", 2)
    assert used(guard, "contacts") == 10
    assert reservation.cancel() is True
    assert used(guard, "contacts") == 2


# -- reservations always close ----------------------------------------------------------


def test_a_reservation_is_a_context_manager_that_cancels_on_an_exception(
    guard: UsageGuard,
) -> None:
    with (
        pytest.raises(ValueError, match="the LLM failed"),
        guard.reserve("acme", "ai_tokens", 400) as failed,
    ):
        assert failed.open
        raise ValueError("the LLM failed")
    assert not failed.open and used(guard, "ai_tokens") == 0
    with guard.reserve("acme", "ai_tokens", 400) as served:
        served.settle(120)
    assert not served.open and used(guard, "ai_tokens") == 120
    assert served.cancel() is False  # settled: nothing left to cancel


def test_open_is_false_once_settled_or_cancelled(guard: UsageGuard) -> None:
    settled, cancelled = guard.reserve("acme", "emails", 2), guard.reserve("acme", "emails", 2)
    assert settled.open and cancelled.open
    assert settled.settle(1) and cancelled.cancel()
    assert not settled.open and not cancelled.open
    assert settled.settle(1) is False and used(guard, "emails") == 1


@pytest.mark.parametrize("side", ["sync", "async"])
def test_a_cost_function_that_raises_closes_the_reservation_at_its_estimate(
    guard: UsageGuard, side: str
) -> None:
    def broken_cost(result: Any) -> int:
        raise KeyError("usage")

    @metered("ai_tokens", amount=300, cost=broken_cost)
    def complete() -> str:
        return "the work ran"

    @metered("ai_tokens", amount=300, cost=broken_cost)
    async def acomplete() -> str:
        return "the work ran"

    async def on_the_async_side() -> None:
        try:
            await acomplete()
        finally:
            await guard.aio.aclose()

    with usage_guard.subject("acme", guard=guard), pytest.raises(KeyError, match="usage"):
        complete() if side == "sync" else asyncio.run(on_the_async_side())
    # The work ran: the estimate stays counted, and the reservation is closed.
    assert used(guard, "ai_tokens") == 300
    plain = raw_client(guard)
    assert not [k for k in plain.scan_iter(f"{guard.calls.prefix}:{{acme}}:r:*")]


@pytest.mark.parametrize("side", ["sync", "async"])
def test_a_cancel_that_fails_never_hides_the_original_error(
    guard: UsageGuard,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    side: str,
) -> None:
    def redis_exploded(self: Any) -> bool:
        raise RuntimeError("redis exploded")

    async def aredis_exploded(self: Any) -> bool:
        raise RuntimeError("redis exploded")

    monkeypatch.setattr(Reservation, "cancel", redis_exploded)
    monkeypatch.setattr(AsyncReservation, "cancel", aredis_exploded)

    @metered("ai_tokens", amount=10, cost=len)
    def complete() -> str:
        raise ValueError("the LLM failed")

    @metered("ai_tokens", amount=10, cost=len)
    async def acomplete() -> str:
        raise ValueError("the LLM failed")

    async def on_the_async_side() -> None:
        try:
            await acomplete()
        finally:
            await guard.aio.aclose()

    with usage_guard.subject("acme", guard=guard), pytest.raises(ValueError, match="LLM"):
        complete() if side == "sync" else asyncio.run(on_the_async_side())
    assert any("could not cancel" in r.getMessage() for r in caplog.records)
