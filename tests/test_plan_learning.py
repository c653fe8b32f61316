"""Each call sends the limits of one plan: the one the guard believes the org is on.

Another process may assign a plan; the script then changes nothing and names the stored
plan, and the guard learns it and calls again: one more round trip, counted in
``stats().plan_refreshes``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conftest import Clock, delete_prefix
from usage_guard import Plan, ThresholdEvent, UsageGuard
from usage_guard import calls as calls_module

PLANS = {
    "free": Plan("free", {"emails": 5, "ai_tokens": 100}),
    "pro": Plan("pro", {"emails": 100, "ai_tokens": 10_000}),
}
MakeProcess = Callable[..., UsageGuard]


@pytest.fixture
def process(storage_url: str, clock: Clock) -> Iterator[MakeProcess]:
    """``process(plans=PLANS)``: a guard as another process would have it, on the same
    server and prefix as every other one of the test."""
    url = f"memory://plans-{uuid.uuid4().hex}" if storage_url == "memory://" else storage_url
    prefix = f"ugt{uuid.uuid4().hex[:10]}"
    made: list[UsageGuard] = []

    def factory(plans: dict[str, Plan] = PLANS) -> UsageGuard:
        guard = UsageGuard.from_url(
            url, plans=plans, default_plan="free", prefix=prefix, clock=clock
        )
        made.append(guard)
        return guard

    yield factory
    for guard in made:
        guard.close()
    if not url.startswith("memory"):
        delete_prefix(made[0].backend.client_url, prefix)


def test_a_plan_assigned_elsewhere_costs_one_more_round_trip_once(process: MakeProcess) -> None:
    admin, worker = process(), process()
    assert worker.consume("acme", "emails", 1).limit == 5
    admin.assign_plan("acme", "pro")
    decision = worker.consume("acme", "emails", 10)
    assert decision.allowed and decision.limit == 100 and decision.used == 11
    assert worker.stats().plan_refreshes == 1
    worker.consume("acme", "emails", 1)
    worker.consume("acme", {"emails": 1, "ai_tokens": 1})
    assert worker.stats().plan_refreshes == 1
    assert admin.stats().plan_refreshes == 0  # it assigned the plan: it knows


def test_a_plan_taken_back_elsewhere_is_enforced_at_once(process: MakeProcess) -> None:
    admin, worker = process(), process()
    admin.assign_plan("acme", "pro")
    assert worker.consume("acme", "emails", 10).allowed  # learnt: pro
    admin.assign_plan("acme", None)
    denied = worker.consume("acme", "emails", 1)
    assert not denied.allowed and denied.limit == 5 and denied.used == 10
    assert worker.stats().plan_refreshes == 2


def test_a_plan_this_process_does_not_configure_gives_the_default_and_a_warning(
    process: MakeProcess, caplog: pytest.LogCaptureFixture
) -> None:
    admin = process({**PLANS, "enterprise": Plan("enterprise", {"emails": 1_000})})
    worker = process()
    admin.assign_plan("acme", "enterprise")
    with caplog.at_level(logging.WARNING, "usage_guard"):
        assert worker.consume("acme", "emails", 1).limit == 5
        assert worker.consume("acme", "emails", 1).limit == 5
    warning = "org 'acme' is assigned plan 'enterprise', which is not configured"
    assert [r.message for r in caplog.records if r.message.startswith(warning)] == [
        f"{warning}: using the default 'free'"
    ]
    assert worker.stats().plan_refreshes == 1
    assert worker.usage("acme").plan == "free"


def test_settling_and_setting_learn_the_plan_too(process: MakeProcess) -> None:
    admin, worker = process(), process()
    reservation = worker.reserve("acme", "emails", 3)
    admin.assign_plan("acme", "pro")
    worker.set_usage("acme", "contacts", 7)
    assert worker.stats().plan_refreshes == 1
    events: list[ThresholdEvent] = []
    worker.on_threshold(events.append)
    admin.set_limit("acme", "emails", 4)  # an override applies whatever the plan
    assert reservation.settle(4) is True
    worker.close()  # delivers the threshold events
    assert [(e.metric, e.threshold) for e in events] == [
        ("emails", 80),
        ("emails", 90),
        ("emails", 100),
    ]
    assert admin.usage("acme").meters["emails"].used == 4


def test_the_async_twin_learns_it_for_both(process: MakeProcess) -> None:
    admin, worker = process(), process()
    admin.assign_plan("acme", "pro")

    async def consume() -> Any:
        try:
            return await worker.aio.consume("acme", "emails", 10)
        finally:
            await worker.aio.aclose()

    assert asyncio.run(consume()).limit == 100
    assert worker.consume("acme", "emails", 1).limit == 100
    assert worker.stats().plan_refreshes == 1


def test_the_guard_remembers_a_bounded_number_of_plans(
    process: MakeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(calls_module, "KNOWN_PLANS", 2)
    admin, worker = process(), process()
    for org in ("a", "b", "c"):
        admin.assign_plan(org, "pro")
        worker.consume(org, "emails", 1)
    assert worker.stats().plan_refreshes == 3
    assert len(worker.calls._assigned) == 2  # "a" was forgotten first
    worker.consume("c", "emails", 1)
    assert worker.stats().plan_refreshes == 3
    worker.consume("a", "emails", 1)
    assert worker.stats().plan_refreshes == 4


def test_a_plan_that_changes_on_every_try_gets_the_outage_policy(
    process: MakeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin, worker = process(), process()
    replanned = worker.calls.replanned
    flips = iter([None, "pro", None])

    def flip_then_replan(call: Any, stored: str, tries_left: int) -> Any:
        admin.assign_plan("acme", next(flips))  # the plan changes before each try
        return replanned(call, stored, tries_left)

    admin.assign_plan("acme", "pro")
    monkeypatch.setattr(worker.calls, "replanned", flip_then_replan)
    decision = worker.consume("acme", "emails", 1)
    assert decision.allowed  # the default policy, "allow"
    stats = worker.stats()
    assert stats.backend_errors_by_class == {"PlanChanging": 1}
    assert all(state == "closed" for state in stats.breakers.values())
    assert admin.usage("acme").meters["emails"].used == 0  # no try counted anything


def test_a_call_carries_one_plan_whatever_the_number_configured() -> None:
    """Flat in plans: the arguments of a consumption do not grow with the plans."""
    many = {f"p{i}": Plan(f"p{i}", {"emails": 10 + i}) for i in range(50)}
    sizes = []
    for plans in ({"p1": many["p1"], "p2": many["p2"]}, many):
        guard = UsageGuard.from_url("memory://", plans=plans, default_plan="p1")
        call = guard.calls.consume("acme", "emails", 1, user=None)
        sizes.append(sum(len(str(arg)) for arg in call.args))
        guard.close()
    assert sizes[0] == sizes[1]
