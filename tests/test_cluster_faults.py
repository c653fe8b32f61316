"""Redis Cluster faults under steady load: a master killed, a master hung, a slot resharded;
and a ``redis+cluster://`` URL naming several seeds.

Each fault test starts its own 3-master, 3-replica cluster (``tests/cluster.py``) and
runs the load of ``tests/test_faults.py`` (``fault_load``'s harness) over 24 orgs:
requests through the ASGI middleware (``POST /send`` meters ``emails``, failing closed:
503; ``GET /ping`` only ``api_calls``, failing open), or ``guard.consume`` from threads.
Every third call is a send for ``acme``, whose hard cap of 1,000 emails the load soon
reaches. The cluster breaks mid-load; asserted:

- no HTTP 500 and no exception out of ``guard.consume``: every call is answered by
  Redis or by ``on_backend_error``, and on a node or slot that did not break only while
  the whole cluster is down (a cluster without one of its masters refuses every command);
- no call longer than ``timeout + 0.5 s``;
- never more than the cap admitted for ``acme``, and its counter, read afterwards with a
  plain client, agrees;
- every org served again within 2 s of the promotion or the migration's end;
- the outage logged (an ERROR while failing, a few at most, a WARNING "reachable again"
  after the last ERROR) and counted: ``guard.failures.backend_errors`` grew by exactly the
  number of calls the policy answered.

``pytest -s`` prints the figures of each scenario and the whole table at the end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
import redis.crc

from cluster import Cluster
from conftest import RedisProcess, free_port, wait_for
from fault_load import Call, Choose, Load
from test_faults import COUNTED, MODES, answered, decided, make_load
from usage_guard import Decision, InvalidUsage, Plan, UsageGuard
from usage_guard.storage import cluster_seeds

TIMEOUT = 0.5  # seconds; 1.0 in the migration tests, so a short migration fits in it
PLANS = {"free": Plan("free", {"emails": 1_000_000, "api_calls": 1_000_000})}
CAPPED = "acme"  # the org whose hard cap the load exceeds; always on the broken node
CAP = 1000
#: An acme send the cap refused.
CAPPED_OUT = frozenset({"denied", "429"})
# Orgs of distinct slots on the broken master and on each other: each slot moved by a
# failover is one more MOVED for a client to follow.
ON_VICTIM, ON_OTHERS = 12, 6
BEFORE, AFTER = 0.5, 2.5  # seconds of load before the fault and after it healed
CAP_WAIT = 10.0  # seconds the load may go on past AFTER until CAPPED has reached its cap
RECOVERY = 2.0  # seconds after the fault healed by which every call succeeds again
#: ERROR lines one fault may log: they are paced to one a minute per kind of failure.
MAX_ERROR_LINES = 2
NOW = datetime(2026, 11, 15, 12, tzinfo=timezone.utc)


def mid_november() -> datetime:
    return NOW


def slot(org: str) -> int:
    return redis.crc.key_slot(f"{{{org}}}".encode())


def month_key() -> str:
    """CAPPED's meters of NOW's month (its emails counter is the field "emails")."""
    return f"ug:{{{CAPPED}}}:m:{NOW:%Y-%m}"


@dataclass
class Fault:
    """What broke, when (monotonic) and when it healed; the orgs whose node or slot broke,
    and those that may fail meanwhile (a cluster without a master refuses every command).
    ``outage``: the policy must answer some calls (and the guard log it)."""

    name: str
    broke: float
    healed: float
    broken: frozenset[str]
    may_fail: frozenset[str]
    outage: bool


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


def mix(orgs: list[str]) -> Choose:
    """Call ``n`` of worker ``w`` is turn ``w + n``: every third turn a send for ``CAPPED``
    (``orgs[0]``), so the load soon reaches its cap; the others a send, then a ping, for
    the other orgs in turn (23 of them: each gets both)."""

    def choose(worker: int, n: int) -> str:
        turn = worker + n
        if turn % 3 == 0:
            return f"send@{orgs[0]}"
        return f"{'send' if turn % 3 == 1 else 'ping'}@{orgs[1 + turn % (len(orgs) - 1)]}"

    return choose


def org_of(call: Call) -> str:
    return call.op.partition("@")[2]


def capped_out(call: Call) -> bool:
    return call.op == f"send@{CAPPED}" and call.outcome in CAPPED_OUT


# -- one run -----------------------------------------------------------------------------


@dataclass
class Run:
    mode: str
    orgs: list[str]
    timeout: float
    load: Load
    fault: Fault
    #: How much ``guard.failures.backend_errors`` grew over the load.
    counted: int
    records: list[logging.LogRecord]
    #: ``CAPPED``'s emails counter after the run, read with a plain client.
    counter: int
    #: ``time.time() - time.monotonic()``, to place log records on the timeline.
    wall: float


def exercise(
    cluster: Cluster,
    seed: RedisProcess,
    mode: str,
    orgs: list[str],
    timeout: float,
    fault: Callable[[], Fault],
    caplog: pytest.LogCaptureFixture,
) -> Run:
    """Load a guard seeded with ``seed``; run ``fault`` after ``BEFORE`` seconds; keep
    loading until ``AFTER`` seconds after it healed and ``CAPPED`` has reached its cap."""
    caplog.set_level(logging.INFO, logger="usage_guard")
    guard = UsageGuard.from_url(
        cluster.url(seed),
        plans=PLANS,
        default_plan="free",
        clock=mid_november,
        timeout=timeout,
        on_backend_error={"emails": "deny"},
    )
    wall = time.time() - time.monotonic()
    try:
        guard.set_limit(CAPPED, "emails", CAP)
        for org in orgs:  # the scripts loaded on every master before the clock starts
            guard.check(org, "emails", 0)
        load = make_load(mode, guard)  # test_faults' requests, ASGI or threads...
        load.choose = mix(orgs)  # ...over this test's orgs
        errors_before = guard.failures.backend_errors
        with load:
            time.sleep(BEFORE)
            broken = fault()
            time.sleep(max(0.0, broken.healed + AFTER - time.monotonic()))
            wait_for(
                lambda: any(capped_out(c) for c in load.calls),
                timeout=CAP_WAIT,
                what=f"{CAPPED} to reach its cap",
            )
        counted = guard.failures.backend_errors - errors_before
    finally:
        guard.close()
    master = cluster.client(cluster.master_of(slot(CAPPED)))
    counter = int(master.hget(month_key(), "emails") or 0)
    records = [r for r in caplog.records if r.name.startswith("usage_guard")]
    return Run(mode, orgs, timeout, load, broken, counted, records, counter, wall)


# -- the verdict and the figures -----------------------------------------------------------

HEADER = (
    "fault",
    "load",
    "calls",
    "healed after",
    "answered by the policy (broken node / elsewhere)",
    "worst latency",
    "all served again after the heal",
    f"`{CAPPED}` admitted / cap",
    "logged ERROR / WARNING",
)
ROWS: list[tuple[str, ...]] = []


@pytest.fixture(scope="module", autouse=True)
def figures() -> Iterator[None]:
    yield
    if ROWS:
        lines = [HEADER, tuple("---" for _ in HEADER), *ROWS]
        print("\n\nCluster faults:\n" + "\n".join(f"| {' | '.join(x)} |" for x in lines))


def judge(run: Run) -> None:
    """Print the run's figures, then fail with every property it broke."""
    load, fault = run.load, run.fault
    problems: list[str] = []
    bound = run.timeout + 0.5

    def on(calls: list[Call], orgs: frozenset[str]) -> list[Call]:
        return [c for c in calls if org_of(c) in orgs]

    warm = [c for c in load.calls if c.end < fault.broke]
    if not warm or not all(answered(c) for c in warm):
        problems.append(f"HARNESS: the warm-up was not answered normally: {load.counts(warm)}")
    broken = [c for c in load.calls if not answered(c) and not decided(c)]
    if broken:
        problems.append(f"neither answered nor decided by the policy: {load.counts(broken)}")

    fallbacks = [c for c in load.calls if decided(c)]
    there = on(fallbacks, fault.broken)
    elsewhere = [c for c in fallbacks if org_of(c) not in fault.may_fail]
    if elsewhere:
        problems.append(
            f"calls of orgs that should not notice answered by the policy: "
            f"{load.counts(elsewhere, key=org_of)}"
        )
    if fault.outage and not fallbacks:
        problems.append("no call answered by the policy: did anything break?")
    if run.counted != len(fallbacks):
        problems.append(
            f"guard.failures.backend_errors grew by {run.counted}, "
            f"{len(fallbacks)} calls answered by the policy"
        )

    worst = load.worst_latency()
    if worst > bound:
        slowest = load.worst()
        problems.append(f"worst latency {worst:.3f} s > {bound} s: {slowest}")

    sends = [c for c in load.calls if c.op == f"send@{CAPPED}"]
    admitted = sum(c.outcome in COUNTED for c in sends)
    if admitted > CAP or run.counter > CAP:
        problems.append(f"over-admission: {admitted} admitted, counter {run.counter}, cap {CAP}")
    if not any(capped_out(c) for c in sends):
        problems.append("cap never reached")

    recovery = load.recovery_after(fault.healed, answered)
    if recovery is None or recovery > RECOVERY:
        problems.append(
            f"no recovery within {RECOVERY} s of the heal ({recovery}); after it: "
            f"{load.counts(load.between(fault.healed))}"
        )
    late = {org_of(c) for c in load.between(fault.healed + RECOVERY) if answered(c)}
    if late != set(run.orgs):
        problems.append(f"not served after the recovery: {set(run.orgs) - late}")

    errors = [r for r in run.records if r.levelno >= logging.ERROR]
    back_again = [
        r
        for r in run.records
        if r.levelno == logging.WARNING and "reachable again" in r.getMessage()
    ]
    if fault.outage or fallbacks:
        failing = (run.wall + fault.broke, run.wall + fault.healed + bound)
        if not any(failing[0] <= r.created <= failing[1] for r in errors):
            problems.append("no ERROR logged while failing")
        if len(errors) > MAX_ERROR_LINES:
            problems.append(f"{len(errors)} ERROR lines (at most {MAX_ERROR_LINES})")
        last_error = max((r.created for r in errors), default=failing[0])
        if not any(r.created >= last_error for r in back_again):
            problems.append('no WARNING "reachable again" after the last ERROR')
    elif errors:
        problems.append(f"{len(errors)} ERRORs logged: {errors[0].getMessage()}")
    logged = "".join(
        f"\n    {r.levelname} {r.created - run.wall - fault.healed:+.2f} s from the heal: "
        f"{r.getMessage()[:90]}"
        for r in run.records
        if r.levelno >= logging.WARNING
    )

    healed = fault.healed - fault.broke
    served = "-" if recovery is None else f"{recovery:.3f} s"
    kind = f"{load.workers} {'ASGI requests at a time' if run.mode == 'asgi' else 'threads'}"
    print(
        f"\n[{run.mode} | {fault.name}] healed {healed:.2f} s after the fault\n"
        f"  load: {len(load.calls)} calls ({load.rate():.0f}/s) from {kind} over "
        f"{len(run.orgs)} orgs, {len(fault.broken)} of them on the broken node or slot\n"
        f"  answered by the policy: {len(there)} of {len(on(load.calls, fault.broken))} calls "
        f"there, {len(fallbacks) - len(there)} elsewhere ({dict(load.counts(fallbacks))}); "
        f"backend_errors +{run.counted}; neither: {len(broken)}\n"
        f"  worst latency {worst:.3f} s (timeout {run.timeout} s); all orgs served again "
        f"{served} after the heal\n"
        f"  logged {len(errors)} ERROR, {len(back_again)} WARNING reachable again{logged}\n"
        f"  {CAPPED}: {admitted} admitted by Redis, cap {CAP}, counter {run.counter}"
    )
    for problem in problems:
        print(f"  FAIL {problem}")
    ROWS.append(
        (
            fault.name,
            f"ASGI, {load.workers} tasks" if run.mode == "asgi" else f"{load.workers} threads",
            f"{len(load.calls):,}",
            f"{healed:.2f} s",
            f"{len(there)} / {len(fallbacks) - len(there)}",
            f"{worst:.2f} s (timeout {run.timeout})",
            served,
            f"{admitted:,} / {CAP:,}",
            f"{len(errors)} / {len(back_again)}",
        )
    )
    assert not problems, "\n".join(problems)


# -- the faults ---------------------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["kill", "pause"])
def test_a_failover_under_load(
    cluster: Cluster, mode: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
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
        on_victim = frozenset(orgs[:ON_VICTIM])
        return Fault(name, broke, promoted, on_victim, frozenset(orgs), outage=True)

    judge(exercise(cluster, seed, mode, orgs, TIMEOUT, fault, caplog))


@pytest.mark.cluster
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", ["short", "long"])
def test_a_slot_migrated_under_load(
    cluster: Cluster, mode: str, size: str, caplog: pytest.LogCaptureFixture
) -> None:
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
        return Fault(name, broke, time.monotonic(), frozenset({CAPPED}), may_fail, outage=False)

    judge(exercise(cluster, source, mode, orgs, 1.0, fault, caplog))


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
