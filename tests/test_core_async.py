"""The asyncio twin: same rules, same storage, same listeners as the sync guard."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from usage_guard import (
    AsyncUsageGuard,
    Decision,
    InvalidAmount,
    Plan,
    ThresholdEvent,
    UnknownMetric,
    UsageGuard,
    listeners,
)

MakeGuard = Callable[..., UsageGuard]
T = TypeVar("T")
PLANS = {"free": Plan("free", {"emails": 10, "ai_tokens": 1000, "contacts": 10})}


def run(guard: UsageGuard | AsyncUsageGuard, scenario: Callable[[], Awaitable[T]]) -> T:
    """Run a scenario on a fresh event loop, closing the async clients on that same loop."""

    async def scenario_then_close() -> T:
        try:
            return await scenario()
        finally:
            await guard.aio.aclose()

    return asyncio.run(scenario_then_close())


def script(guard: Any) -> list[Any]:
    """The same calls, for a sync guard (results) or an async one (awaitables)."""
    return [
        guard.consume("acme", "emails", 4),
        guard.consume("acme", {"emails": 4, "contacts": 3}, user="alice"),
        guard.consume("acme", "emails", 3),
        guard.check("acme", "emails", 2),
        guard.consume("acme", "ai_tokens", 300, user="alice", idempotency_key="k"),
        guard.consume("acme", "ai_tokens", 300, user="alice", idempotency_key="k"),
    ]


def test_the_async_guard_takes_the_same_decisions(make_guard: MakeGuard) -> None:
    sync_guard = make_guard(plans=PLANS, default_plan="free")
    async_guard = make_guard(plans=PLANS, default_plan="free").aio

    async def scenario() -> list[Decision]:
        decisions = []
        for call in script(async_guard):
            decisions.append(await call)
        return decisions

    assert run(async_guard, scenario) == script(sync_guard)


def test_the_twins_share_storage_and_listeners(make_guard: MakeGuard) -> None:
    guard = make_guard(plans=PLANS, default_plan="free")
    assert guard.aio.sync is guard and guard.aio.aio is guard.aio
    events: list[ThresholdEvent] = []
    guard.on_threshold(events.append)
    awaited: list[int] = []

    async def slow_listener(event: ThresholdEvent) -> None:
        await asyncio.sleep(0)
        awaited.append(event.threshold)

    guard.aio.on_threshold(slow_listener)
    guard.consume("acme", "emails", 7)

    async def scenario() -> Decision:
        return await guard.aio.consume("acme", "emails", 2)

    decision = run(guard, scenario)
    assert (decision.allowed, decision.used) == (True, 9)
    assert [e.threshold for e in events] == [80, 90] and awaited == [80, 90]
    assert guard.usage("acme").meters["emails"].used == 9


def test_every_listener_hears_every_event_whichever_side_crossed_it(
    make_guard: MakeGuard,
) -> None:
    # Before, an async listener was dropped when sync code (a FastAPI def endpoint, a
    # Flask view, a job) crossed the threshold, and never heard of it again.
    guard = make_guard(plans=PLANS, default_plan="free")
    heard: list[tuple[str, int]] = []

    async def async_listener(event: ThresholdEvent) -> None:
        await asyncio.sleep(0)
        heard.append(("async", event.threshold))

    guard.on_threshold(async_listener)
    guard.aio.on_threshold(lambda event: heard.append(("sync", event.threshold)))
    assert guard.consume("acme", "emails", 8).allowed  # sync code crosses 80 %

    async def crossing_90() -> None:
        await guard.aio.consume("acme", "emails", 1)  # async code crosses 90 %

    run(guard, crossing_90)
    assert guard.runtime.events.drain(5) == 0
    assert heard == [("async", 80), ("sync", 80), ("async", 90), ("sync", 90)]


def test_listeners_run_off_the_request_path(make_guard: MakeGuard) -> None:
    guard = make_guard(plans=PLANS, default_plan="free")
    release = threading.Event()
    guard.on_threshold(lambda event: release.wait(5))
    started = time.monotonic()
    assert guard.consume("acme", "emails", 8).allowed  # a slow listener does not hold it
    assert time.monotonic() - started < 2
    release.set()
    assert guard.runtime.events.drain(5) == 0


def test_what_the_queue_cannot_take_is_dropped_counted_and_logged(
    make_guard: MakeGuard, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(listeners, "QUEUE_SIZE", 1)
    guard = make_guard(plans=PLANS, default_plan="free")
    release = threading.Event()
    guard.on_threshold(lambda event: release.wait(5))
    guard.consume("acme", "emails", 8)  # 80 %: delivering
    guard.consume("acme", "emails", 1)  # 90 %: no room
    release.set()
    assert guard.runtime.events.drain(5) == 0
    assert guard.failures.dropped_events == 1
    assert "were dropped" in caplog.text


def test_async_reservations_admin_and_usage(make_guard: MakeGuard, clock: Any) -> None:
    guard = make_guard(plans=PLANS, default_plan="free")
    aguard = guard.aio

    async def scenario() -> None:
        await aguard.set_budget("acme", "alice", "ai_tokens", 500)
        reservation = await aguard.reserve("acme", "ai_tokens", 400, user="alice")
        assert reservation.decision.scope == "personal"
        denied = await aguard.reserve("acme", "ai_tokens", 200, user="alice")
        assert not denied.decision.allowed and await denied.settle(1) is False
        clock.set(2026, 12, 1)
        assert await reservation.settle(450) is True
        assert await reservation.cancel() is False
        cancelled = await aguard.reserve("acme", "emails", 5)
        assert await cancelled.cancel() is True
        await aguard.set_limit("acme", "contacts", 2)
        assert not (await aguard.consume("acme", "contacts", 3)).allowed
        await aguard.remove_limit("acme", "contacts")
        await aguard.set_usage("acme", "contacts", 9)
        await aguard.release("acme", "contacts", 4)
        await aguard.assign_plan("acme", "free")
        usage = await aguard.usage("acme", user="alice")
        assert usage.meters["contacts"].used == 5
        assert usage.meters["ai_tokens"].history[-2:] == (450, 0)
        assert usage.plan == "free" and usage.personal["ai_tokens"].budget == 500
        with pytest.raises(InvalidAmount):
            await aguard.consume("acme", "emails", -1)
        with pytest.raises(UnknownMetric):
            await aguard.check("acme", "sms")

    run(aguard, scenario)


def test_async_from_url_builds_a_guard(make_guard: MakeGuard, storage_url: str) -> None:
    # The make_guard guard reserves a prefix whose keys are deleted after the test.
    prefix = make_guard().calls.prefix
    aguard = AsyncUsageGuard.from_url(
        storage_url, plans=PLANS, default_plan="free", prefix=prefix, clock=clock_of(make_guard)
    )
    assert isinstance(aguard, AsyncUsageGuard) and aguard.sync.aio is aguard

    async def scenario() -> Decision:
        return await aguard.consume("acme", "emails", 10)

    decision = run(aguard, scenario)
    assert (decision.allowed, decision.used, decision.limit) == (True, 10, 10)
    assert aguard.sync.usage("acme").meters["emails"].used == 10
    aguard.sync.close()


def clock_of(make_guard: MakeGuard) -> Any:
    return make_guard().calls.clock


def test_many_concurrent_async_consumptions_admit_exactly_the_limit(
    make_guard: MakeGuard,
) -> None:
    guard = make_guard(plans=PLANS, default_plan="free")
    guard.set_limit("acme", "emails", 150)

    async def scenario() -> list[Decision]:
        # The first calls of a new client: on a cluster they all wait for one connection set-up.
        return await asyncio.gather(*(guard.aio.consume("acme", "emails") for _ in range(300)))

    decisions = run(guard, scenario)
    assert sum(d.allowed for d in decisions) == 150
    assert sorted(d.used for d in decisions if d.allowed) == list(range(1, 151))
    assert guard.usage("acme").meters["emails"].used == 150


def test_the_async_guard_serves_one_event_loop_after_another(make_guard: MakeGuard) -> None:
    """As asgiref runs each async view of a WSGI app (Django, Flask): a loop per call,
    closed after it without ``aclose()``. Each loop's connection closes with its loop."""
    guard = make_guard(plans=PLANS, default_plan="free")

    async def send_one() -> bool:
        decision = await guard.aio.consume("acme", "emails", 1)
        return decision.allowed

    assert [asyncio.run(send_one()) for _ in range(3)] == [True, True, True]
    assert guard.usage("acme").meters["emails"].used == 3


@pytest.mark.parametrize("storage_url", ["memory"], indirect=True)
def test_loops_closed_without_asyncio_run_are_forgotten(make_guard: MakeGuard) -> None:
    guard = make_guard(plans=PLANS, default_plan="free")
    for _ in range(5):
        loop = asyncio.new_event_loop()
        loop.run_until_complete(guard.aio.consume("acme", "emails", 1))
        loop.close()  # no shutdown_asyncgens(): nothing closed the loop's client
    runner: Any = guard.backend.aio()
    assert len(runner._by_loop) == 1  # the last loop's; the others were dropped
    assert guard.usage("acme").meters["emails"].used == 5
