"""Several processes hammering one hard cap admit exactly the limit, never one more."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest

from usage_guard import Plan, UsageGuard

MakeGuard = Callable[..., UsageGuard]
PLANS = {"free": Plan("free", {"emails": 10})}
PROCESSES = 4


def mid_november() -> datetime:
    return datetime(2026, 11, 15, 12, tzinfo=timezone.utc)


def hammer(url: str, prefix: str, attempts: int, start: Any) -> int:
    """Runs in a spawned process: try ``attempts`` consumptions, return how many were admitted."""
    guard = UsageGuard.from_url(url, plans=PLANS, prefix=prefix, clock=mid_november)
    guard.check("acme", "emails", 0)  # connect and load the script before the race
    start.wait()
    admitted = sum(
        guard.consume("acme", {"emails": 1, "contacts": 1}).allowed for _ in range(attempts)
    )
    guard.close()
    return admitted


def race(make_guard: MakeGuard, url: str, limit: int, attempts: int) -> None:
    guard = make_guard(plans=PLANS, clock=mid_november)
    guard.set_limit("acme", "emails", limit)
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        start = manager.Event()
        with context.Pool(PROCESSES) as pool:
            runs = [
                pool.apply_async(hammer, (url, guard.calls.prefix, attempts, start))
                for _ in range(PROCESSES)
            ]
            start.set()
            admitted = sum(run.get(timeout=120) for run in runs)
    meters = guard.usage("acme").meters
    assert admitted == limit
    assert meters["emails"].used == limit and meters["contacts"].used == limit


@pytest.mark.real_redis
@pytest.mark.parametrize("storage_url", ["redis"], indirect=True)
def test_processes_never_exceed_a_hard_cap_on_redis(
    make_guard: MakeGuard, storage_url: str
) -> None:
    race(make_guard, storage_url, limit=500, attempts=250)


@pytest.mark.cluster
@pytest.mark.parametrize("storage_url", ["cluster"], indirect=True)
def test_processes_never_exceed_a_hard_cap_on_a_cluster(
    make_guard: MakeGuard, storage_url: str
) -> None:
    race(make_guard, storage_url, limit=100, attempts=50)


def test_threads_never_exceed_a_hard_cap(make_guard: MakeGuard) -> None:
    from concurrent.futures import ThreadPoolExecutor

    guard = make_guard(plans=PLANS)
    guard.set_limit("acme", "emails", 120)
    with ThreadPoolExecutor(8) as pool:
        admitted = sum(
            d.allowed for d in pool.map(lambda _: guard.consume("acme", "emails"), range(240))
        )
    assert admitted == 120 and guard.usage("acme").meters["emails"].used == 120
