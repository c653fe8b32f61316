"""Threshold events at 80, 90 and 100 % of an org limit: once per (org, metric, threshold,
period)."""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import pytest

from conftest import raw_client
from usage_guard import Plan, ThresholdEvent, UsageGuard
from usage_guard.keys import KeySpace

MakeGuard = Callable[..., UsageGuard]
PLANS = {
    "free": Plan(
        "free",
        {"emails": 10, "contacts": 10, "lead_captures": 7, "storage": 100, "ai_tokens": 100},
    )
}


@pytest.fixture
def guard(make_guard: MakeGuard) -> UsageGuard:
    return make_guard(plans=PLANS, default_plan="free")


class Delivered(list[ThresholdEvent]):
    """The events a listener got. Listeners run on a background thread: reading this
    first waits for what is queued to be delivered."""

    def __init__(self, guard: UsageGuard) -> None:
        super().__init__()
        self.guard = guard

    def _delivered(self) -> None:
        assert self.guard.runtime.events.drain(5) == 0

    def __eq__(self, other: object) -> bool:
        self._delivered()
        return list.__eq__(self, other)

    def __iter__(self) -> Iterator[ThresholdEvent]:
        self._delivered()
        return list.__iter__(self)

    def __len__(self) -> int:
        self._delivered()
        return list.__len__(self)

    __hash__ = None


@pytest.fixture
def events(guard: UsageGuard) -> list[ThresholdEvent]:
    received = Delivered(guard)
    guard.on_threshold(received.append)
    return received


def reached(events: list[ThresholdEvent]) -> list[tuple[str, int, int]]:
    return [(e.metric, e.threshold, e.used) for e in events]


def test_each_threshold_is_emitted_once_as_it_is_reached(
    guard: UsageGuard, events: list[ThresholdEvent]
) -> None:
    guard.consume("acme", "emails", 7)
    assert events == []
    for _ in range(4):
        guard.consume("acme", "emails", 1)
    assert events == [
        ThresholdEvent("acme", "emails", 80, 8, 10, "2026-11"),
        ThresholdEvent("acme", "emails", 90, 9, 10, "2026-11"),
        ThresholdEvent("acme", "emails", 100, 10, 10, "2026-11"),
    ]


def test_a_jump_emits_every_threshold_it_crosses_in_order(
    guard: UsageGuard, events: list[ThresholdEvent]
) -> None:
    guard.consume("acme", "emails", 10)
    assert reached(events) == [("emails", 80, 10), ("emails", 90, 10), ("emails", 100, 10)]


def test_thresholds_of_an_uneven_limit_round_up(
    guard: UsageGuard, events: list[ThresholdEvent]
) -> None:
    # lead_captures limit 7: 80 % is 5.6, 90 % is 6.3.
    guard.consume("acme", "lead_captures", 5)
    assert events == []
    guard.consume("acme", "lead_captures", 1)
    assert reached(events) == [("lead_captures", 80, 6)]
    guard.consume("acme", "lead_captures", 1)
    assert reached(events)[1:] == [("lead_captures", 90, 7), ("lead_captures", 100, 7)]


def test_soft_caps_measure_thresholds_against_the_limit(
    guard: UsageGuard, events: list[ThresholdEvent]
) -> None:
    guard.consume("acme", "contacts", 9)
    assert reached(events) == [("contacts", 80, 9), ("contacts", 90, 9)]
    guard.consume("acme", "contacts", 2)  # 11: within the 110 % tolerance
    assert reached(events)[2:] == [("contacts", 100, 11)]


def test_a_release_does_not_rearm_a_threshold(
    guard: UsageGuard, events: list[ThresholdEvent]
) -> None:
    guard.consume("acme", "contacts", 8)
    guard.release("acme", "contacts", 5)
    guard.consume("acme", "contacts", 5)
    assert reached(events) == [("contacts", 80, 8)]
    guard.consume("acme", "contacts", 1)
    assert reached(events)[1:] == [("contacts", 90, 9)]


def test_settles_and_set_usage_can_reach_thresholds(
    guard: UsageGuard, events: list[ThresholdEvent]
) -> None:
    reservation = guard.reserve("acme", "emails", 5)
    assert events == []
    reservation.settle(9)
    assert reached(events) == [("emails", 80, 9), ("emails", 90, 9)]
    guard.set_usage("acme", "storage", 100)
    assert reached(events)[2:] == [
        ("storage", 80, 100),
        ("storage", 90, 100),
        ("storage", 100, 100),
    ]


def test_checks_denials_and_unlimited_meters_emit_nothing(
    guard: UsageGuard, events: list[ThresholdEvent]
) -> None:
    guard.check("acme", "emails", 10)
    guard.consume("acme", "emails", 11)
    guard.consume("acme", "api_calls", 10**9)
    guard.set_limit("acme", "import_rows", 0)
    guard.consume("acme", "import_rows", 0)
    assert events == []


def test_a_new_period_rearms_the_thresholds(
    guard: UsageGuard, events: list[ThresholdEvent], clock: Any
) -> None:
    clock.set(2026, 11, 30, 23, 59, 59, 999999)
    guard.consume("acme", "emails", 8)
    guard.consume("acme", "contacts", 8)
    clock.set(2026, 12, 1)
    guard.consume("acme", "emails", 8)
    guard.consume("acme", "contacts", 1)  # cumulative: 9, in the new calendar month
    assert [(e.metric, e.threshold, e.period) for e in events] == [
        ("emails", 80, "2026-11"),
        ("contacts", 80, "2026-11"),
        ("emails", 80, "2026-12"),
        ("contacts", 80, "2026-12"),
        ("contacts", 90, "2026-12"),
    ]


def test_a_cumulative_settle_in_a_later_month_belongs_to_that_month(
    guard: UsageGuard, events: list[ThresholdEvent], clock: Any
) -> None:
    clock.set(2026, 11, 30, 23, 50)
    guard.consume("acme", "contacts", 1)
    reservation = guard.reserve("acme", {"contacts": 1, "emails": 1}, ttl=3600)
    clock.set(2026, 12, 1, 0, 10)
    reservation.settle({"contacts": 8, "emails": 9})  # contacts: 9; November's emails: 9
    assert [(e.metric, e.threshold, e.used, e.period) for e in events] == [
        ("contacts", 80, 9, "2026-12"),
        ("contacts", 90, 9, "2026-12"),
        ("emails", 80, 9, "2026-11"),
        ("emails", 90, 9, "2026-11"),
    ]
    meters = guard.usage("acme").meters
    assert meters["contacts"].history[-2:] == (1, 9)  # November ended at 1
    assert meters["emails"].history[-2:] == (9, 0)
    guard.consume("acme", "contacts", 1)  # 10: December's 80 and 90 % have fired
    guard.consume("acme", "emails", 9)  # December's own emails
    assert [(e.metric, e.threshold, e.period) for e in events][4:] == [
        ("contacts", 100, "2026-12"),
        ("emails", 80, "2026-12"),
        ("emails", 90, "2026-12"),
    ]


def test_a_late_settle_counts_in_its_month_and_leaves_the_newer_months_record(
    guard: UsageGuard, events: list[ThresholdEvent], clock: Any
) -> None:
    space, client = KeySpace(guard.calls.prefix, "acme"), raw_client(guard)
    clock.set(2026, 11, 30, 23, 50)
    guard.consume("acme", "ai_tokens", 70, user="alice")
    reservation = guard.reserve("acme", "ai_tokens", 5, user="alice", ttl=3600)  # 75: no alert
    clock.set(2026, 12, 1, 0, 10)
    guard.consume("acme", "ai_tokens", 85, user="bob")  # December's 80 % is recorded
    assert reservation.settle(25) is True  # November: 70 + 25
    assert [(e.threshold, e.used, e.period) for e in events] == [
        (80, 85, "2026-12"),
        (80, 95, "2026-11"),
        (90, 95, "2026-11"),
    ]
    # November's hash gets the count and no record: only the newest month's is read.
    assert client.hgetall(space.meters("2026-11")) == {"ai_tokens": "95"}
    assert client.hgetall(space.meters("2026-12")) == {"ai_tokens": "85", "t:ai_tokens": "80"}
    # No personal count: December's are bob's alone (its first one dropped November's).
    assert client.hgetall(space.personal("2026-12")) == {"bob:ai_tokens": "85"}
    assert not client.exists(space.personal("2026-11"))
    assert guard.usage("acme", user="alice").personal["ai_tokens"].used == 0
    guard.consume("acme", "ai_tokens", 5, user="bob")  # 90: December's 80 % stays fired
    assert [(e.threshold, e.used, e.period) for e in events][3:] == [(90, 90, "2026-12")]


def test_a_late_settle_does_not_fire_again_what_its_hold_fired(
    guard: UsageGuard, events: list[ThresholdEvent], clock: Any
) -> None:
    """The hold crossed November's 80 %; settled in December, the reservation reports
    only what the actual amount crossed beyond the hold."""
    clock.set(2026, 11, 30, 23, 50)
    guard.consume("acme", "ai_tokens", 70)
    reservation = guard.reserve("acme", "ai_tokens", 10, ttl=3600)  # 80: November's 80 %
    clock.set(2026, 12, 1, 0, 10)
    assert reservation.settle(25) is True  # November: 70 + 25
    assert [(e.threshold, e.used, e.period) for e in events] == [
        (80, 80, "2026-11"),
        (90, 95, "2026-11"),
    ]


def test_thresholds_are_per_org(guard: UsageGuard, events: list[ThresholdEvent]) -> None:
    guard.consume("acme", "emails", 8)
    guard.consume("globex", "emails", 8)
    assert [(e.org, e.threshold) for e in events] == [("acme", 80), ("globex", 80)]


def test_a_failing_listener_is_logged_and_the_others_still_run(
    guard: UsageGuard, events: list[ThresholdEvent], caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: ThresholdEvent) -> None:
        raise RuntimeError("listener bug")

    guard.on_threshold(broken)
    later: list[ThresholdEvent] = []
    guard.on_threshold(later.append)
    with caplog.at_level(logging.ERROR, logger="usage_guard"):
        assert guard.consume("acme", "emails", 8).allowed
    assert len(events) == len(later) == 1
    assert any("listener" in r.getMessage() for r in caplog.records)


def mid_november() -> datetime:
    return datetime(2026, 11, 15, 12, tzinfo=timezone.utc)


def consume_one_by_one(url: str, prefix: str, attempts: int, start: Any) -> list[int]:
    """Runs in a spawned process: consume 1 email ``attempts`` times, return the thresholds
    this process was told about."""
    guard = UsageGuard.from_url(
        url, plans=PLANS, default_plan="free", prefix=prefix, clock=mid_november
    )
    seen: list[int] = []
    guard.on_threshold(lambda event: seen.append(event.threshold))
    start.wait()
    for _ in range(attempts):
        guard.consume("acme", "emails", 1)
    guard.close()
    return seen


@pytest.mark.real_redis
@pytest.mark.parametrize("storage_url", ["redis"], indirect=True)
def test_thresholds_fire_exactly_once_across_processes(
    make_guard: MakeGuard, storage_url: str
) -> None:
    guard = make_guard(plans=PLANS, default_plan="free", clock=mid_november)
    guard.set_limit("acme", "emails", 40)
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        start = manager.Event()
        with context.Pool(4) as pool:
            runs = [
                pool.apply_async(consume_one_by_one, (storage_url, guard.calls.prefix, 15, start))
                for _ in range(4)
            ]
            start.set()
            seen = [threshold for run in runs for threshold in run.get(timeout=60)]
    assert sorted(seen) == [80, 90, 100]
    assert guard.usage("acme").meters["emails"].used == 40
