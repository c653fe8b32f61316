"""Fault injection under steady load (issue 9): Redis paused, killed and restarted empty,
its scripts flushed, out of memory, loading, or refusing the guard's password, while
requests keep coming through the ASGI middleware (async) or ``guard.consume`` (threads).

Every scenario runs its own ``redis-server`` on a free loopback port (stopped by pid).
The load mixes ``send`` (``emails``, a hard cap of 200 that fails closed: 503) and
``ping`` (``api_calls``, failing open) for one organization at a time: a new one every
half second, so each one's cap is fought over while the fault happens. Asserted:

- no HTTP 500 and no exception out of ``guard.consume``: a call is answered by Redis
  (200/429, admitted/denied) or decided by ``on_backend_error`` (``scope="unavailable"``);
- no call longer than ``timeout + 0.5 s``;
- never more than the cap admitted, per organization and server lifetime, and the
  counter read afterwards with a plain client agrees;
- recovery within 1 s of the server answering again, without restarting anything;
- the outage logged (an ERROR while failing, a WARNING "reachable again" after the
  last ERROR) and counted (``guard.failures.backend_errors``).

``pytest -s`` prints one line of figures per scenario and the whole table at the end.
"""

from __future__ import annotations

import bisect
import gc
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from conftest import RedisProcess
from fault_load import (
    AsyncLoad,
    AsyncRequest,
    Call,
    Choose,
    Load,
    ThreadLoad,
    asgi_client,
)
from scripted import ScriptedServer
from usage_guard import Decision, Plan, UsageGuard, UsageGuardMiddleware
from usage_guard.asgi import Rule, from_headers
from usage_guard.periods import Period, utc_now

pytestmark = pytest.mark.real_redis

TIMEOUT = 0.5
CAP = 200
PLANS = {"free": Plan("free", {"emails": CAP, "api_calls": 1_000_000})}
LATENCY_BOUND = TIMEOUT + 0.5
RECOVERY_BOUND = 1.0
#: Seconds of normal load before the fault, and after the server answers again.
WARM_UP, AFTER = 0.6, 1.5
#: How long most faults last (a pause lasts PAUSE).
FAULT, PAUSE = 1.5, 2.0
#: Each organization gets this many seconds of load: every one's cap is fought over.
ORG_WINDOW = 0.5
OPS = ("send", "ping")
METRICS = {"send": "emails", "ping": "api_calls"}
THREADS, TASKS = 8, 16
MODES = ("asgi", "threads")
#: ERROR lines one short fault may log: one per kind of failure (the password scenario
#: has two: its dropped connections, then the refused password); more is log spam.
MAX_ERROR_LINES = 2
LOADING = b"-LOADING Redis is loading the dataset in memory\r\n"

#: Answers from Redis: admitted or denied by the cap (sync decisions, HTTP statuses).
ANSWERED = frozenset({"admitted", "denied", "200", "429"})
#: What on_backend_error must decide while Redis cannot answer, per kind of call.
DECIDED = {
    "send": frozenset({"unavailable denied", "503"}),  # emails fail closed
    "ping": frozenset({"unavailable allowed", "200 open"}),  # api_calls fail open
}
#: Counted by the cap: an admitted send.
COUNTED = frozenset({"admitted", "200"})


def answered(call: Call) -> bool:
    return call.outcome in ANSWERED


def decided(call: Call) -> bool:
    return call.outcome in DECIDED[call.kind]


def now() -> float:
    return time.monotonic()


# -- the load -----------------------------------------------------------------------------


def org_per_window(started: float) -> Choose:
    """``send``/``ping`` alternating, for the organization of the current half second."""

    def choose(worker: int, n: int) -> str:
        org = int((time.monotonic() - started) / ORG_WINDOW)
        return f"{OPS[(worker + n) % len(OPS)]}@org{org}"

    return choose


def decision_outcome(decision: Decision) -> str:
    if decision.scope == "unavailable":
        return "unavailable allowed" if decision.allowed else "unavailable denied"
    return "admitted" if decision.allowed else "denied"


def response_outcome(response: httpx.Response) -> str:
    # An admitted metered response carries RateLimit fields; one decided while Redis is
    # unreachable has no quota to show.
    if response.status_code == 200 and "ratelimit" not in response.headers:
        return "200 open"
    return str(response.status_code)


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def make_app(guard: UsageGuard) -> Starlette:
    app = Starlette(routes=[Route("/send", ok, methods=["POST"]), Route("/ping", ok)])
    app.add_middleware(
        UsageGuardMiddleware,
        guard=guard,
        identify=from_headers("x-org-id", "x-user-id"),
        rules=[Rule("/send", "emails", 1, frozenset({"POST"}))],
    )
    return app


def make_load(mode: str, guard: UsageGuard) -> Load:
    choose = org_per_window(time.monotonic())
    if mode == "threads":

        def consume(op: str) -> str:
            kind, _, org = op.partition("@")
            return decision_outcome(guard.consume(org, METRICS[kind], 1))

        return ThreadLoad(consume, workers=THREADS, choose=choose)

    app = make_app(guard)

    @asynccontextmanager
    async def session() -> AsyncIterator[AsyncRequest]:
        async with asgi_client(app, close=[guard.aio.aclose]) as client:

            async def request(op: str) -> str:
                kind, _, org = op.partition("@")
                headers = {"x-org-id": org}
                try:
                    if kind == "send":
                        response = await client.post("/send", headers=headers)
                    else:
                        response = await client.get("/ping", headers=headers)
                except httpx.HTTPError:
                    raise  # the harness's own failure: recorded by its name
                except Exception as error:  # raised by the app: a server answers 500
                    return f"500 {type(error).__name__}"
                return response_outcome(response)

            yield request

    return AsyncLoad(session, workers=TASKS, choose=choose)


# -- servers --------------------------------------------------------------------------------


class Servers:
    """The redis-servers of one test, stopped by pid after it (resumed first if paused)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[RedisProcess] = []

    def start(self, *extra: str, port: int | None = None) -> RedisProcess:
        server = RedisProcess(self.directory / f"redis-{len(self.started)}", *extra, port=port)
        self.started.append(server)
        return server

    def stop(self) -> None:
        for server in self.started:
            if server.process.poll() is None:
                os.kill(server.process.pid, signal.SIGCONT)
            server.stop()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    started = Servers(tmp_path)
    yield started
    started.stop()


def kill(server: RedisProcess) -> None:
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=10)


# -- one run ----------------------------------------------------------------------------


@dataclass
class Timeline:
    """What a fault did, in ``time.monotonic()`` seconds."""

    #: When the fault began.
    fault: float
    #: When the server answered again; ``None``: it never stopped answering.
    back: float | None
    #: When the server was replaced by an empty one (a new lifetime for its counters).
    replaced: list[float] = field(default_factory=list)


@dataclass
class Run:
    fault: str
    mode: str
    load: Load
    timeline: Timeline
    #: ``guard.failures.backend_errors`` when the fault began and after the run.
    errors_before: int
    errors_after: int
    records: list[logging.LogRecord]
    #: Each organization's emails counter on the last server, read with a plain client.
    counters: dict[str, int]
    #: ``time.time() - time.monotonic()``, to place log records on the timeline.
    wall: float


def exercise(
    fault_name: str,
    mode: str,
    url: str,
    fault: Callable[[], Timeline],
    observe: Callable[[], redis.Redis],
    caplog: pytest.LogCaptureFixture,
) -> Run:
    """Load the guard at ``url``, run ``fault`` after a warm-up, keep loading a while."""
    caplog.set_level(logging.INFO, logger="usage_guard")
    guard = UsageGuard.from_url(
        url,
        plans=PLANS,
        default_plan="free",
        timeout=TIMEOUT,
        on_backend_error={"emails": "deny"},
    )
    wall = time.time() - time.monotonic()
    try:
        load = make_load(mode, guard)
        with load:
            time.sleep(WARM_UP)
            errors_before = guard.failures.backend_errors
            timeline = fault()
            time.sleep(AFTER)
        errors_after = guard.failures.backend_errors
    finally:
        guard.close()
    gc.collect()  # an unclosed socket warns here, in the test that leaked it
    final = len(timeline.replaced)
    orgs = {c.op.partition("@")[2] for c in load.calls if lifetime(c, timeline) == final}
    period = Period.containing(utc_now()).key
    with observe() as client:
        months = {org: f"ug:{{{org}}}:m:{period}" for org in orgs}
        counters = {org: int(client.hget(month, "emails") or 0) for org, month in months.items()}
    records = [r for r in caplog.records if r.name.startswith(("usage_guard", "asyncio"))]
    return Run(
        fault_name, mode, load, timeline, errors_before, errors_after, records, counters, wall
    )


def lifetime(call: Call, timeline: Timeline) -> int:
    """Which server answered a call: 0 the first, 1 its empty replacement, ..."""
    return bisect.bisect_right(timeline.replaced, call.start)


# -- the verdict and the figures --------------------------------------------------------------


@dataclass
class Row:
    fault: str
    mode: str
    calls: int
    rate: float
    worst: float
    recovery: float | None
    admitted: int
    capped: str
    decided: int
    counted: int
    logs: str
    broken: int

    HEADER = (
        "fault",
        "load",
        "calls",
        "calls/s",
        "worst s",
        "recovery s",
        f"admitted/{CAP}",
        "capped",
        "decided",
        "counted",
        "logs E/W",
        "broken",
    )

    def cells(self) -> tuple[str, ...]:
        return (
            self.fault,
            self.mode,
            str(self.calls),
            f"{self.rate:.0f}",
            f"{self.worst:.3f}",
            "-" if self.recovery is None else f"{self.recovery:.3f}",
            str(self.admitted),
            self.capped,
            str(self.decided),
            str(self.counted),
            self.logs,
            str(self.broken),
        )


ROWS: list[Row] = []


def table(rows: list[Row]) -> str:
    lines = [Row.HEADER, *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(Row.HEADER))]
    out = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
        for line in lines
    ]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


@pytest.fixture(scope="module", autouse=True)
def figures() -> Iterator[None]:
    yield
    if ROWS:
        print(f"\n\nFault injection (timeout {TIMEOUT} s, cap {CAP}):\n{table(ROWS)}")


def judge(run: Run) -> None:
    """Record the run's figures, then fail with every property it broke."""
    load, timeline = run.load, run.timeline
    outage = timeline.back is not None
    problems: list[str] = []

    def at(moment: float) -> str:
        return f"{moment - timeline.fault:+.2f} s"

    warm = [c for c in load.calls if c.end < timeline.fault]
    if not warm or not all(answered(c) for c in warm):
        problems.append(f"HARNESS: the warm-up was not answered normally: {load.counts(warm)}")

    broken = [c for c in load.calls if not answered(c) and not decided(c)]
    if broken:
        problems.append(
            f"{len(broken)} calls neither answered by Redis nor decided by on_backend_error "
            f"(the first began at {at(min(c.start for c in broken))} from the fault): "
            f"{dict(load.counts(broken))}"
        )
    fallbacks = [c for c in load.calls if decided(c)]
    if not outage and fallbacks:
        problems.append(
            f"{len(fallbacks)} calls decided as outages though Redis kept answering "
            f"(first at {at(min(c.start for c in fallbacks))}): {dict(load.counts(fallbacks))}"
        )

    worst = load.worst()
    assert worst is not None
    if worst.latency > LATENCY_BOUND:
        slow = [c for c in load.calls if c.latency > LATENCY_BOUND]
        problems.append(
            f"{len(slow)} calls took longer than {LATENCY_BOUND} s; the worst "
            f"{worst.latency:.3f} s (began at {at(worst.start)}, {worst.op} -> {worst.outcome})"
        )

    admitted = Counter(
        (c.op.partition("@")[2], lifetime(c, timeline))
        for c in load.calls
        if c.kind == "send" and c.outcome in COUNTED
    )
    over = {key: n for key, n in admitted.items() if n > CAP}
    if over:
        problems.append(f"over-admission (org, server lifetime) -> admitted: {over}")
    final = len(timeline.replaced)
    for org, counter in sorted(run.counters.items()):
        if not admitted[org, final] <= counter <= CAP:
            problems.append(
                f"{org}: counter {counter} on the server, {admitted[org, final]} admitted, "
                f"cap {CAP}"
            )

    recovery = None
    counted = run.errors_after - run.errors_before
    ours = [r for r in run.records if r.name.startswith("usage_guard")]
    errors = [r for r in ours if r.levelno >= logging.ERROR]
    back_again = [
        r for r in ours if r.levelno == logging.WARNING and "reachable again" in r.getMessage()
    ]
    notes = Counter(r.getMessage() for r in run.records if r.name.startswith("asyncio"))
    if timeline.back is not None:
        recovery = load.recovery_after(timeline.back, answered)
        if recovery is None or recovery > RECOVERY_BOUND:
            since = load.between(timeline.back)
            problems.append(
                f"no recovery within {RECOVERY_BOUND} s of the server answering again "
                f"(recovery: {recovery}); after it: {dict(load.counts(since))}"
            )
        first, last = run.wall + timeline.fault, run.wall + timeline.back + LATENCY_BOUND
        if not any(first <= r.created <= last for r in errors):
            problems.append("no ERROR logged while failing")
        if len(errors) > MAX_ERROR_LINES:
            problems.append(
                f"{len(errors)} ERROR lines for one fault of {FAULT}-{PAUSE} s "
                f"(at most {MAX_ERROR_LINES}: one per kind of failure)"
            )
        last_error = max((r.created for r in errors), default=first)
        if not any(r.created >= last_error for r in back_again):
            problems.append('no WARNING "reachable again" after the last ERROR')
        if counted <= 0:
            problems.append(f"guard.failures.backend_errors did not grow ({run.errors_after})")
    else:
        if errors:
            problems.append(f"{len(errors)} ERRORs logged: {errors[0].getMessage()}")
        if counted:
            problems.append(f"guard.failures.backend_errors grew by {counted}")

    caps = list(admitted.values())
    row = Row(
        run.fault,
        run.mode,
        len(load.calls),
        load.rate(),
        worst.latency,
        recovery,
        max(caps, default=0),
        f"{sum(n == CAP for n in caps)}/{len(caps)}",
        len(fallbacks),
        counted,
        f"{len(errors)}/{len(back_again)}",
        len(broken),
    )
    ROWS.append(row)
    print(f"\n{' | '.join(row.cells())}")
    for message, n in notes.items():
        print(f"  note: asyncio logged {n} x {message!r}")
    for problem in problems:
        print(f"  FAIL {problem}")
    assert not problems, "\n".join(problems)


# -- the scenarios --------------------------------------------------------------------------


def plain(port: int, password: str | None = None) -> Callable[[], redis.Redis]:
    return lambda: redis.Redis(port=port, password=password)


@pytest.mark.parametrize("mode", MODES)
def test_no_fault(mode: str, servers: Servers, caplog: pytest.LogCaptureFixture) -> None:
    """The harness itself: with nothing going wrong, every property holds."""
    server = servers.start()

    def nothing() -> Timeline:
        started = now()
        time.sleep(FAULT)
        return Timeline(started, None)

    judge(exercise("none", mode, server.url, nothing, plain(server.port), caplog))


@pytest.mark.parametrize("mode", MODES)
def test_paused(mode: str, servers: Servers, caplog: pytest.LogCaptureFixture) -> None:
    """SIGSTOP for 2 s: connections open, no answer; then SIGCONT."""
    server = servers.start()

    def pause() -> Timeline:
        started = now()
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            time.sleep(PAUSE)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        return Timeline(started, now())

    judge(exercise("SIGSTOP 2 s", mode, server.url, pause, plain(server.port), caplog))


@pytest.mark.parametrize("mode", MODES)
def test_killed_and_restarted_empty(
    mode: str, servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL, 1.5 s without a server, then a new empty one on the same port."""
    server = servers.start()

    def restart() -> Timeline:
        started = now()
        kill(server)
        time.sleep(FAULT)
        servers.start(port=server.port)
        return Timeline(started, now(), replaced=[started])

    judge(exercise("SIGKILL, restart", mode, server.url, restart, plain(server.port), caplog))


@pytest.mark.parametrize("mode", MODES)
def test_script_flush(mode: str, servers: Servers, caplog: pytest.LogCaptureFixture) -> None:
    """SCRIPT FLUSH ten times over 1.5 s: NOSCRIPT is handled, nothing is an outage."""
    server = servers.start()

    def flush() -> Timeline:
        started = now()
        with redis.Redis(port=server.port) as admin:
            for _ in range(10):
                admin.script_flush()
                time.sleep(FAULT / 10)
        return Timeline(started, None)

    judge(exercise("SCRIPT FLUSH x10", mode, server.url, flush, plain(server.port), caplog))


def out_of_memory(admin: redis.Redis) -> None:
    """2 MiB of data, then ``maxmemory 1mb``: every write answers -OOM (checked)."""
    for i in range(32):
        admin.set(f"filler:{i}", b"x" * 65536)
    admin.config_set("maxmemory", "1mb")
    try:
        admin.set("filler:check", b"x")
    except redis.exceptions.OutOfMemoryError:  # -OOM, under redis-py's name for it
        return
    raise RuntimeError("HARNESS: maxmemory is not in force: a write was accepted")


@pytest.mark.parametrize("mode", MODES)
def test_out_of_memory(mode: str, servers: Servers, caplog: pytest.LogCaptureFixture) -> None:
    """Writes answer -OOM (maxmemory 1mb, noeviction, 2 MiB used) for 1.5 s; then
    maxmemory is raised again."""
    server = servers.start("--maxmemory-policy", "noeviction")

    def oom() -> Timeline:
        with redis.Redis(port=server.port) as admin:
            started = now()
            out_of_memory(admin)
            time.sleep(max(0.0, started + FAULT - now()))
            admin.config_set("maxmemory", "0")
            back = now()
        return Timeline(started, back)

    judge(exercise("OOM (maxmemory)", mode, server.url, oom, plain(server.port), caplog))


@pytest.mark.parametrize("mode", MODES)
def test_loading(mode: str, servers: Servers, caplog: pytest.LogCaptureFixture) -> None:
    """A restart that loads its dataset: SIGKILL, then every command answered -LOADING for
    1.5 s (a scripted server on the same port), then a real, empty server there."""
    server = servers.start()
    answered_loading = 0

    def loading() -> Timeline:
        nonlocal answered_loading
        started = now()
        kill(server)
        stand_in = ScriptedServer(lambda connection, command: LOADING, port=server.port)
        try:
            time.sleep(FAULT)
        finally:
            stand_in.close()
        answered_loading = stand_in.commands
        servers.start(port=server.port)
        return Timeline(started, now(), replaced=[started])

    run = exercise("-LOADING, restart", mode, server.url, loading, plain(server.port), caplog)
    assert answered_loading > 0, "HARNESS: nothing reached the -LOADING server"
    judge(run)


@pytest.mark.parametrize("mode", MODES)
def test_wrong_password(mode: str, servers: Servers, caplog: pytest.LogCaptureFixture) -> None:
    """The server's password changes (``--requirepass`` s3cret -> rotated) and its clients
    are dropped: the guard's URL now has a wrong one (WRONGPASS on every new connection);
    1.5 s later the password is set back."""
    server = servers.start("--requirepass", "s3cret")
    url = f"redis://:s3cret@127.0.0.1:{server.port}/0"

    def rotate() -> Timeline:
        with redis.Redis(port=server.port, password="s3cret") as admin:
            started = now()
            admin.config_set("requirepass", "rotated")
            admin.client_kill_filter(_type="normal", skipme=True)
            time.sleep(FAULT)
            admin.config_set("requirepass", "s3cret")
            back = now()
        return Timeline(started, back)

    judge(exercise("wrong password", mode, url, rotate, plain(server.port, "s3cret"), caplog))
