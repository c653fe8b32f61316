"""Redis Cluster faults under steady load: a master killed, a master hung, a slot resharded;
and a ``redis+cluster://`` URL naming several seeds.

Each fault test starts its own 3-master, 3-replica cluster (``tests/cluster.py``),
runs consumptions over 24 orgs from 32 asyncio tasks or 8 threads, breaks the
cluster mid-load and checks what callers see: no exception, no call slower than
the timeout allows, never one admission past a hard cap, every org served again
soon after the cluster has healed. ``pytest -s`` prints the figures.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
import redis.cluster

from cluster import Cluster
from conftest import RedisProcess, free_port
from usage_guard import Decision, InvalidUsage, Plan, UsageGuard
from usage_guard.storage import cluster_seeds

TIMEOUT = 0.5  # seconds; 1.0 in the migration tests, so a short migration fits in it
PLANS = {"free": Plan("free", {"emails": 1_000_000})}
CAPPED = "acme"  # the org whose hard cap the load exceeds; always on the broken node
CAP = 1000
# Orgs of distinct slots on the broken master and on each other: each slot moved by a
# failover is one more MOVED for a client to follow.
ON_VICTIM, ON_OTHERS = 12, 6
TASKS, THREADS = 32, 8
PACE = 0.002  # seconds each worker waits between its calls: a steady load, not a flood
BEFORE, AFTER = 0.5, 2.5  # seconds of load before the fault and after it healed
CAP_WAIT = 10.0  # seconds the load may go on past AFTER until CAPPED has reached its cap
RECOVERY = 2.0  # seconds after the fault healed by which every call succeeds again
NOW = datetime(2026, 11, 15, 12, tzinfo=timezone.utc)


def mid_november() -> datetime:
    return NOW


def slot(org: str) -> int:
    return redis.cluster.key_slot(f"{{{org}}}".encode())


@dataclass
class Call:
    org: str
    started: float
    ended: float
    decision: Decision | None
    error: BaseException | None = None


@dataclass
class Fault:
    """What broke, when (monotonic) and when it healed; the orgs whose node or slot broke,
    and those that may fail meanwhile (a cluster without a master refuses every command)."""

    name: str
    broke: float
    healed: float
    broken: frozenset[str]
    may_fail: frozenset[str]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    started = Cluster(tmp_path / "cluster", masters=3, replicas=1)
    yield started
    started.stop()


def pick_orgs(cluster: Cluster, victim: RedisProcess) -> list[str]:
    """``CAPPED`` (on ``victim``), then orgs of other slots: ``ON_VICTIM - 1`` more on
    ``victim``, ``ON_OTHERS`` on each other master."""
    orgs, wanted = [CAPPED], {m.port: ON_OTHERS for m in cluster.masters()}
    wanted[victim.port] = ON_VICTIM - 1
    slots = {slot(CAPPED)}
    for i in range(10_000):
        org = f"org{i}"
        port = cluster.master_of(slot(org)).port
        if slot(org) not in slots and wanted[port] > 0:
            wanted[port] -= 1
            slots.add(slot(org))
            orgs.append(org)
        if not any(wanted.values()):
            return orgs
    raise LookupError("not enough orgs")


def pick(orgs: list[str], turn: int) -> str:
    """Every third call is for ``CAPPED`` (``orgs[0]``), so the load soon reaches its cap."""
    return orgs[0] if turn % 3 == 0 else orgs[1 + turn % (len(orgs) - 1)]


def make_guard(cluster: Cluster, seed: RedisProcess, timeout: float) -> UsageGuard:
    guard = UsageGuard.from_url(
        cluster.url(seed),
        plans=PLANS,
        default_plan="free",
        clock=mid_november,
        timeout=timeout,
        on_backend_error="allow",
    )
    guard.set_limit(CAPPED, "emails", CAP)
    return guard


def call_async(
    guard: UsageGuard, orgs: list[str], fault: Callable[[], Fault]
) -> tuple[list[Call], Fault]:
    calls: list[Call] = []
    capped_out = threading.Event()

    async def worker(first: int, stop: asyncio.Event) -> None:
        turn = first
        while not stop.is_set():
            org, turn = pick(orgs, turn), turn + 1
            started = time.monotonic()
            try:
                decision = await guard.aio.consume(org, "emails", 1)
            except Exception as error:
                calls.append(Call(org, started, time.monotonic(), None, error))
            else:
                calls.append(Call(org, started, time.monotonic(), decision))
                if decision.scope == "organization" and not decision.allowed:
                    capped_out.set()
            await asyncio.sleep(PACE)

    async def main() -> Fault:
        for org in orgs:  # connected and scripts loaded before the clock starts
            await guard.aio.check(org, "emails", 0)
        stop = asyncio.Event()
        workers = [asyncio.ensure_future(worker(i, stop)) for i in range(TASKS)]
        try:
            await asyncio.sleep(BEFORE)
            broken = await asyncio.to_thread(fault)
            await asyncio.sleep(broken.healed + AFTER - time.monotonic())
            await asyncio.to_thread(capped_out.wait, CAP_WAIT)
        finally:
            stop.set()
            await asyncio.gather(*workers)
            await guard.aio.aclose()
        return broken

    return calls, asyncio.run(main())


def call_sync(
    guard: UsageGuard, orgs: list[str], fault: Callable[[], Fault]
) -> tuple[list[Call], Fault]:
    calls: list[Call] = []
    stop, capped_out = threading.Event(), threading.Event()

    def worker(first: int) -> None:
        turn = first
        while not stop.is_set():
            org, turn = pick(orgs, turn), turn + 1
            started = time.monotonic()
            try:
                decision = guard.consume(org, "emails", 1)
            except Exception as error:
                calls.append(Call(org, started, time.monotonic(), None, error))
            else:
                calls.append(Call(org, started, time.monotonic(), decision))
                if decision.scope == "organization" and not decision.allowed:
                    capped_out.set()
            time.sleep(PACE)

    for org in orgs:
        guard.check(org, "emails", 0)
    with ThreadPoolExecutor(THREADS) as pool:
        workers = [pool.submit(worker, i) for i in range(THREADS)]
        time.sleep(BEFORE)
        try:
            broken = fault()
            time.sleep(broken.healed + AFTER - time.monotonic())
            capped_out.wait(CAP_WAIT)
        finally:
            stop.set()
        for done in workers:
            done.result()
    return calls, broken


def check(
    cluster: Cluster, guard: UsageGuard, mode: str, orgs: list[str], calls: list[Call], fault: Fault
) -> None:
    timeout = guard.backend.timeout
    errors = Counter(type(c.error).__name__ for c in calls if c.error is not None)
    failed = [c for c in calls if c.decision is not None and c.decision.scope == "unavailable"]
    capped = [c.decision for c in calls if c.org == CAPPED and c.decision is not None]
    admitted = sum(d.allowed and d.scope != "unavailable" for d in capped)
    counter = int(cluster.client(cluster.master_of(slot(CAPPED))).get(counter_key()) or 0)
    worst = max(c.ended - c.started for c in calls)
    recovery = max((c.ended for c in failed), default=fault.healed) - fault.healed
    on_broken = sum(c.org in fault.broken for c in calls)
    failed_on_broken = sum(c.org in fault.broken for c in failed)
    print(
        f"\n[{mode} | {fault.name}] healed {fault.healed - fault.broke:.2f} s after the fault\n"
        f"  load: {len(calls)} calls from {TASKS if mode == 'async' else THREADS} "
        f"{'tasks' if mode == 'async' else 'threads'} over {len(orgs)} orgs, "
        f"{len(fault.broken)} of them on the broken node or slot\n"
        f"  unavailable: {failed_on_broken} of {on_broken} calls there, "
        f"{len(failed) - failed_on_broken} of {len(calls) - on_broken} elsewhere; "
        f"exceptions: {dict(errors) or 0}\n"
        f"  worst latency {worst:.3f} s (timeout {timeout} s); all orgs served again "
        f"{max(recovery, 0):.3f} s after the heal\n"
        f"  {CAPPED}: {admitted} admitted by Redis, cap {CAP}, counter {counter}"
    )
    assert not errors, f"exceptions escaped: {errors}"
    assert worst <= timeout + 0.5
    assert admitted <= CAP and counter <= CAP
    assert any(d.scope == "organization" and not d.allowed for d in capped), "cap never reached"
    assert recovery <= RECOVERY
    assert not [c.org for c in failed if c.org not in fault.may_fail]
    late = {c.org for c in calls if c.started > fault.healed + RECOVERY}
    assert late == set(orgs)  # every org was called, successfully, after the recovery


def counter_key() -> str:
    return f"ug:{{{CAPPED}}}:c:emails:{NOW:%Y-%m}"


# -- the faults ---------------------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.parametrize("mode", ["async", "sync"])
@pytest.mark.parametrize("how", ["kill", "pause"])
def test_a_failover_under_load(cluster: Cluster, mode: str, how: str) -> None:
    victim = cluster.master_of(slot(CAPPED))
    seed = next(m for m in cluster.masters() if m is not victim)
    orgs = pick_orgs(cluster, victim)

    def fault() -> Fault:
        broke = time.monotonic()
        if how == "kill":
            _, promoted = cluster.kill(victim)
            name = "master killed (SIGKILL), replica promoted"
        else:
            _, promoted = cluster.pause(victim)
            name = "master hung (SIGSTOP) until its replica was promoted"
        return Fault(name, broke, promoted, frozenset(orgs[:ON_VICTIM]), frozenset(orgs))

    guard = make_guard(cluster, seed, TIMEOUT)
    try:
        calls, broken = (call_async if mode == "async" else call_sync)(guard, orgs, fault)
    finally:
        guard.close()
    check(cluster, guard, mode, orgs, calls, broken)


@pytest.mark.cluster
@pytest.mark.parametrize("mode", ["async", "sync"])
@pytest.mark.parametrize("size", ["short", "long"])
def test_a_slot_migrated_under_load(cluster: Cluster, mode: str, size: str) -> None:
    """A migration shorter than the timeout costs no call: they wait for it. During a
    longer one (a tenant's slot with many keys) the org's calls fall back to the policy.
    Orgs of other slots never notice either."""
    source = cluster.master_of(slot(CAPPED))
    target = next(m for m in cluster.masters() if m is not source)
    orgs = pick_orgs(cluster, source)
    keys, hold = (0, 0.6) if size == "short" else (150_000, 0.0)
    filler = cluster.client(source).pipeline(transaction=False)
    for i in range(keys):
        filler.set(f"{{{CAPPED}}}:filler:{i}", "x" * 100)
    filler.execute()

    def fault() -> Fault:
        broke = time.monotonic()
        cluster.migrate_slot(slot(CAPPED), target, hold=hold)
        name = f"slot of {CAPPED!r} migrated ({keys} more keys, held {hold} s)"
        may_fail = frozenset() if size == "short" else frozenset({CAPPED})
        return Fault(name, broke, time.monotonic(), frozenset({CAPPED}), may_fail)

    guard = make_guard(cluster, source, timeout=1.0)
    try:
        calls, broken = (call_async if mode == "async" else call_sync)(guard, orgs, fault)
    finally:
        guard.close()
    check(cluster, guard, mode, orgs, calls, broken)


# -- seeds ---------------------------------------------------------------------------------


def test_a_cluster_url_names_several_seeds() -> None:
    url = "redis+cluster://alice:p%40ss@h1:7000,h2,[::1]:7002/0?ssl_cert_reqs=none"
    assert cluster_seeds(url) == (
        "redis://alice:p%40ss@h1:7000/0?ssl_cert_reqs=none",
        [("h1", 7000), ("h2", 6379), ("::1", 7002)],
    )
    assert cluster_seeds("rediss+cluster://h1:7000")[0] == "rediss://h1:7000"
    for bad in ("redis+cluster://h1:7000,,h2:7001", "redis+cluster://h1:port", "redis+cluster://"):
        with pytest.raises(InvalidUsage):
            UsageGuard.from_url(bad)


@pytest.mark.cluster
def test_a_dead_first_seed_is_skipped(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "cluster", masters=1, password="s3cret")
    # Nothing listens on the first and last seeds; the first one's options still apply.
    seeds = f"127.0.0.1:{free_port()},127.0.0.1:{cluster.nodes[0].port},127.0.0.1:{free_port()}"
    guard = UsageGuard.from_url(
        f"redis+cluster://default:s3cret@{seeds}/0?health_check_interval=30",
        plans=PLANS,
        default_plan="free",
        timeout=TIMEOUT,
    )

    async def consume() -> Decision:
        try:
            return await guard.aio.consume(CAPPED, "emails")
        finally:
            await guard.aio.aclose()

    try:
        assert guard.consume(CAPPED, "emails").scope == "organization"
        assert asyncio.run(consume()).used == 2
    finally:
        guard.close()
        cluster.stop()
