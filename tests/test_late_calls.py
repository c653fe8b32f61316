"""A consumption that runs after its caller gave up does what the caller was told.

Each consumption carries the moment its client gives up on it, by Redis's clock
(usage_guard.servertime); consume.lua compares it with TIME. Late under fail-closed:
nothing changes (the caller was refused). Late under fail-open: counted, never denied
(the caller was served). Measured end to end with a real server paused under load:
no phantom charge, and every served call that reached Redis is counted once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from flask import Flask
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from conftest import RedisProcess, raw_client, wait_for
from usage_guard import (
    Decision,
    Plan,
    ThresholdEvent,
    UsageGuard,
    UsageGuardMiddleware,
    metered,
    wire,
)
from usage_guard.asgi import from_headers
from usage_guard.calls import Call
from usage_guard.flask import UsageGuardFlask
from usage_guard.keys import KeySpace
from usage_guard.multiplexed import MultiplexedScripts
from usage_guard.servertime import DRIFT, ServerClock
from usage_guard.wire import Endpoint

PLANS = {"free": Plan("free", {"emails": 10, "ai_tokens": 10})}
MakeGuard = Callable[..., UsageGuard]


def run_late(guard: UsageGuard, call: Call[Decision]) -> Decision:
    """Run ``call`` as if its caller had given up long ago (deadline: 1 ms after the epoch)."""
    assert call.deadline_arg is not None
    call.args[call.deadline_arg] = 1
    reply = guard.backend.sync().run(call.script, call.keys, call.args)
    return guard.runtime.completed(call, reply, guard.failures.backend_errors)


def keys_and_values(guard: UsageGuard) -> dict[str, Any]:
    client = raw_client(guard)
    prefix = guard.calls.prefix
    found = sorted(client.scan_iter(match=f"{prefix}:*"))
    return {key: client.dump(key) for key in found}


def test_a_late_consumption_under_fail_closed_changes_nothing(make_guard: MakeGuard) -> None:
    guard = make_guard(plans=PLANS, default_plan="free", on_backend_error="deny")
    guard.consume("acme", "ai_tokens", 5, user="alice")
    before = keys_and_values(guard)
    decision = run_late(guard, guard.calls.consume("acme", "ai_tokens", 1, user="alice"))
    assert (decision.allowed, decision.scope) == (False, "unavailable")
    assert keys_and_values(guard) == before


def test_a_late_consumption_under_fail_open_is_counted_past_the_cap(
    make_guard: MakeGuard,
) -> None:
    guard = make_guard(plans=PLANS, default_plan="free")
    guard.set_budget("acme", "alice", "ai_tokens", 3)
    guard.consume("acme", "ai_tokens", 2, user="alice")
    decision = run_late(guard, guard.calls.consume("acme", "ai_tokens", 9, user="alice"))
    assert (decision.allowed, decision.scope) == (True, "unavailable")
    usage = guard.usage("acme", user="alice")
    assert usage.meters["ai_tokens"].used == 11  # over the hard cap: the caller was served
    assert usage.personal["ai_tokens"].used == 11
    # Counted once: a late call is never tried again.
    assert guard.usage("acme").meters["ai_tokens"].used == 11


def filled_by_a_late_call(make_guard: MakeGuard) -> tuple[UsageGuard, list[ThresholdEvent]]:
    """A guard whose org's emails a late call filled (it reports no threshold), and the
    threshold events its listener hears."""
    guard = make_guard(plans=PLANS, default_plan="free")
    events: list[ThresholdEvent] = []
    guard.on_threshold(events.append)
    run_late(guard, guard.calls.consume("acme", "emails", 10, user=None))
    return guard, events


def test_thresholds_a_late_call_crossed_are_reported_by_the_next_denial(
    make_guard: MakeGuard,
) -> None:
    guard, events = filled_by_a_late_call(make_guard)
    guard.close()  # delivers the events
    assert events == []
    denied = guard.consume("acme", "emails")
    assert not denied.allowed
    guard.close()
    assert sorted(e.threshold for e in events) == [80, 90, 100]
    guard.consume("acme", "emails")
    guard.close()
    assert len(events) == 3  # each once


def test_a_late_idempotent_consumption_is_remembered(make_guard: MakeGuard) -> None:
    guard = make_guard(plans=PLANS, default_plan="free")
    call = guard.calls.consume("acme", "emails", 4, user=None, idempotency_key="job-1")
    assert run_late(guard, call).scope == "unavailable"
    assert guard.consume("acme", "emails", 4, idempotency_key="job-1").replayed
    assert guard.usage("acme").meters["emails"].used == 4


@pytest.mark.parametrize("kind", ["check", "reserve"])
def test_a_late_check_or_reservation_counts_nothing_even_under_fail_open(
    make_guard: MakeGuard, kind: str
) -> None:
    guard = make_guard(plans=PLANS, default_plan="free")
    guard.consume("acme", "emails", 1)
    before = keys_and_values(guard)
    if kind == "check":
        call = guard.calls.consume("acme", "emails", 2, user=None, check=True)
    else:
        call = guard.calls.reserve("acme", "emails", 2, user=None)[0]
    assert run_late(guard, call).scope == "unavailable"
    assert keys_and_values(guard) == before


def test_a_consumption_before_its_deadline_is_decided_as_usual(make_guard: MakeGuard) -> None:
    guard = make_guard(plans=PLANS, default_plan="free", on_backend_error="deny")
    call = guard.calls.consume("acme", "emails", 3, user=None)
    assert call.deadline_arg is not None
    call.args[call.deadline_arg] = int(time.time() * 1000) + 60_000
    reply = guard.backend.sync().run(call.script, call.keys, call.args)
    decision = guard.runtime.completed(call, reply, 0)
    assert (decision.allowed, decision.scope, decision.used) == (True, "organization", 3)


# -- the client's side of the invariant ---------------------------------------------------


def test_a_deadline_never_falls_after_the_moment_the_client_gives_up() -> None:
    # Redis read 1000.000 s; the reply came back at monotonic 10.0 (Redis's reading was
    # taken at some moment up to then): the true offset is at least 990.0.
    clock = ServerClock.reading(("1000", "0"), 10.0)
    # 0.5 s later, less the drift, rounded down, less the millisecond uvloop may round off.
    assert clock.deadline(10.5) == 1_000_500 - 2
    # An hour after the reading the drift allowance has grown to DRIFT * 3600 s.
    later = clock.deadline(10.0 + 3600)
    assert later <= (1000 + 3600 - DRIFT * 3600) * 1000
    assert clock.stale(10.0 + 61) and not clock.stale(10.0 + 59)


def test_a_multiplexed_call_is_given_up_on_with_the_oldest_call_on_its_connection(
    redis_process: RedisProcess,
) -> None:
    """The connection fails every waiting call once its oldest is late: a call sent behind
    a slow one carries the older call's moment, not its own full timeout."""
    timeout = 0.4
    runner = MultiplexedScripts(
        Endpoint.from_url(f"redis://127.0.0.1:{redis_process.port}", timeout)
    )
    guard = UsageGuard.from_url(f"redis://127.0.0.1:{redis_process.port}", timeout=timeout)

    async def scenario() -> tuple[int, int, float]:
        await runner.command("PING")
        first = guard.calls.consume("acme", "emails", 1, user=None)
        second = guard.calls.consume("acme", "emails", 1, user=None)
        assert first.deadline_arg is not None and second.deadline_arg is not None
        first_call = asyncio.ensure_future(
            runner.run(first.script, first.keys, first.args, None, first.deadline_arg)
        )
        await asyncio.sleep(0)  # the first call is sent (its reply is awaited)
        os.kill(redis_process.process.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(timeout / 2)
            sent_at = time.time()
            second_call = asyncio.ensure_future(
                runner.run(second.script, second.keys, second.args, None, second.deadline_arg)
            )
            await asyncio.gather(first_call, second_call, return_exceptions=True)
        finally:
            os.kill(redis_process.process.pid, signal.SIGCONT)
            await runner.close()
        return int(first.args[first.deadline_arg]), int(second.args[second.deadline_arg]), sent_at

    first_deadline, second_deadline, sent_at = asyncio.run(scenario())
    guard.close()
    assert second_deadline <= first_deadline
    # Its own timeout would have put it about timeout / 2 later.
    assert second_deadline < (sent_at + timeout * 0.75) * 1000


# -- end to end: a server paused under load ---------------------------------------------

TIMEOUT = 0.3
ORGS = 600


def under_load(
    guard: UsageGuard, flavour: str, stop: Callable[[bool], None]
) -> dict[str, Decision]:
    """One consumption per org, at about 200 a second, started on a schedule whatever
    the earlier ones do (so a hung server gathers calls in flight); the server is paused
    for the middle second and a half. Returns each org's decision."""
    decisions: dict[str, Decision] = {}
    orgs = [f"org{n}" for n in range(ORGS)]
    interval = 1 / 200
    # Halfway between two calls: one that Redis runs as it stops, its reply not yet
    # written, is the open case the README names (a reply lost), not a late call.
    pause_at = (ORGS * 0.25 + 0.5) * interval
    resume_at = pause_at + 1.5

    def controller(started: float) -> None:
        time.sleep(max(0.0, started + pause_at - time.monotonic()))
        stop(True)
        time.sleep(max(0.0, started + resume_at - time.monotonic()))
        stop(False)

    if flavour == "sync":
        workers: list[threading.Thread] = []

        def one(org: str) -> None:
            decisions[org] = guard.consume(org, "emails")

        started = time.monotonic()
        control = threading.Thread(target=controller, args=(started,))
        control.start()
        for n, org in enumerate(orgs):
            time.sleep(max(0.0, started + n * interval - time.monotonic()))
            worker = threading.Thread(target=one, args=(org,))
            worker.start()
            workers.append(worker)
        for worker in workers:
            worker.join()
        control.join()
    else:

        async def scenario() -> None:
            aguard = guard.aio

            async def one(org: str) -> None:
                decisions[org] = await aguard.consume(org, "emails")

            started = time.monotonic()
            control = asyncio.get_running_loop().run_in_executor(None, controller, started)
            tasks = []
            for n, org in enumerate(orgs):
                await asyncio.sleep(max(0.0, started + n * interval - time.monotonic()))
                tasks.append(asyncio.ensure_future(one(org)))
            await asyncio.gather(*tasks)
            await control
            await aguard.aclose()

        asyncio.run(scenario())
    return decisions


def charged(guard: UsageGuard, orgs: list[str]) -> dict[str, int]:
    """Each org's emails counter, read with a plain client once Redis has run every call."""
    client = raw_client(guard)
    period = guard.calls.time.now()[0]
    months = {org: KeySpace.of(guard.calls.prefix, org).meters(period.key) for org in orgs}

    def settled() -> bool:  # what the paused server had queued has run
        before = [client.hget(month, "emails") for month in months.values()]
        time.sleep(0.3)
        return [client.hget(month, "emails") for month in months.values()] == before

    wait_for(settled, what="Redis ran what it had queued")
    return {org: int(client.hget(month, "emails") or 0) for org, month in months.items()}


class Sent:
    """Counts the EVALSHAs the lean clients write, and those Redis ran (INFO commandstats)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, port: int) -> None:
        self.written = 0
        self.admin = redis.Redis(port=port, decode_responses=True)
        call, pack_evalsha = wire._Socket.call, wire.evalsha

        def counting_call(socket: Any, command: bytes) -> Any:
            self.written += b"EVALSHA" in command[:24]
            return call(socket, command)

        def counting_evalsha(*args: Any) -> bytes:
            self.written += 1
            return pack_evalsha(*args)

        monkeypatch.setattr(wire._Socket, "call", counting_call)
        monkeypatch.setattr("usage_guard.multiplexed.evalsha", counting_evalsha)

    def ran(self) -> int:
        stats = self.admin.info("commandstats").get("cmdstat_evalsha", {"calls": 0})
        return int(stats["calls"])


@pytest.mark.real_redis
@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("policy", ["deny", "allow"])
def test_a_paused_server_charges_no_refused_call_and_every_served_call_it_ran(
    redis_process: RedisProcess,
    paused: Callable[[bool], None],
    monkeypatch: pytest.MonkeyPatch,
    flavour: str,
    policy: str,
) -> None:
    guard = UsageGuard.from_url(
        f"redis://127.0.0.1:{redis_process.port}/0",
        # The calls in flight during the pause (hundreds of about 400 bytes) fill more
        # than one of Redis's 16 KB reads, as a busy app's do.
        plans={"free": Plan("free", {"emails": 1})},
        default_plan="free",
        timeout=TIMEOUT,
        on_backend_error=policy,  # type: ignore[arg-type]
    )
    # Fail-open: every org's cap is reached first, so a late call that was checked
    # again would be denied, although its caller was served.
    full = policy == "allow"
    guard.consume("warm-up", "emails")  # the script is loaded
    if full:
        for n in range(ORGS):
            assert guard.consume(f"org{n}", "emails").allowed
    sent = Sent(monkeypatch, redis_process.port)
    ran_before = sent.ran()
    decisions = under_load(guard, flavour, paused)
    guard.close()
    counts = charged(guard, list(decisions))
    by_redis = {org for org, d in decisions.items() if d.scope != "unavailable"}
    by_policy = set(decisions) - by_redis
    assert len(by_policy) > 20, "the pause must leave calls unanswered"
    assert all(counts[org] == 1 for org in by_redis)  # admitted once, or full and denied
    assert all(decisions[org].allowed is not full for org in by_redis)
    counted_late = {org for org in by_policy if counts[org] == 1 + full}
    assert all(counts[org] in (full, 1 + full) for org in by_policy)  # never twice
    # Every consumption written to the socket ran, those answered by the policy too:
    # a connection given up on is read until its late replies are in.
    ran_late = sent.ran() - ran_before - len(by_redis)
    assert sent.ran() - ran_before == sent.written
    assert ran_late > 0
    if policy == "deny":
        assert counted_late == set()  # no phantom charge
    else:
        # The calls in flight when their clients gave up ran when Redis resumed, and
        # were counted past the cap; the others were never sent (the breaker refused them).
        assert len(counted_late) == ran_late
    sent.admin.close()


def test_a_check_that_finds_the_meter_full_reports_and_records_nothing(
    make_guard: MakeGuard,
) -> None:
    guard, events = filled_by_a_late_call(make_guard)
    before = keys_and_values(guard)
    assert not guard.check("acme", "emails").allowed
    guard.close()
    assert events == [] and keys_and_values(guard) == before  # a check changes nothing
    assert not guard.consume("acme", "emails").allowed
    guard.close()
    assert sorted(e.threshold for e in events) == [80, 90, 100]


# -- a clock reading that erred too far is read again ---------------------------------


def skewed(clock: ServerClock | None) -> ServerClock:
    """``clock`` a whole second early: every deadline passes before it is sent."""
    assert clock is not None
    return ServerClock(clock.offset - 1.0, clock.read_at)


@pytest.mark.real_redis
@pytest.mark.parametrize("client", ["lean", "redis-py"])
def test_a_late_reply_to_a_caller_still_waiting_drops_the_clock_reading(
    redis_process: RedisProcess, client: str
) -> None:
    """A slow reading of TIME errs early by its round trip, for a minute: the first call
    it makes late, answered while its caller still waits, has it read again."""
    url = f"redis://127.0.0.1:{redis_process.port}/0?client={client}"
    guard = UsageGuard.from_url(url, plans=PLANS, default_plan="free", on_backend_error="deny")
    assert guard.consume("acme", "emails").allowed  # the clock is read
    runner: Any = guard.backend.sync()
    if client == "lean":
        runner._clock = skewed(runner._clock)
    else:
        runner._nodes._clocks[""] = skewed(runner._nodes._clocks[""])
    assert guard.consume("acme", "emails").scope == "unavailable"  # late: refused
    assert guard.consume("acme", "emails").scope == "organization"  # read again
    assert guard.usage("acme").meters["emails"].used == 2
    guard.close()


@pytest.mark.real_redis
def test_a_late_reply_drops_the_multiplexed_connections_clock_reading(
    redis_process: RedisProcess,
) -> None:
    guard = UsageGuard.from_url(
        f"redis://127.0.0.1:{redis_process.port}/0", plans=PLANS, default_plan="free"
    )

    async def scenario() -> list[str]:
        aio = guard.aio
        scopes: list[str] = [(await aio.consume("acme", "emails")).scope]
        connection: Any = guard.backend.aio()._connection  # type: ignore[attr-defined]
        connection.clock = skewed(connection.clock)
        scopes += [(await aio.consume("acme", "emails")).scope for _ in range(2)]
        await aio.aclose()
        return scopes

    assert asyncio.run(scenario()) == ["organization", "unavailable", "organization"]
    # Fail-open: the late one was served, and counted.
    assert guard.usage("acme").meters["emails"].used == 3
    guard.close()


# -- an integration's consumption counts only if its request is served ---------------


def guarded_app(guard: UsageGuard) -> Starlette:
    """api_calls metered by the middleware (failing open), ai_tokens by @metered in the
    route (failing closed, as in the README)."""

    @metered("ai_tokens", 10)
    async def generate() -> str:
        return "text"

    async def ai(request: Request) -> PlainTextResponse:
        return PlainTextResponse(await generate())

    async def plain(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/ai", ai), Route("/plain", plain)])
    app.add_middleware(
        UsageGuardMiddleware, guard=guard, identify=from_headers(), rate_limits=False
    )
    return app


def mixed_policy_guard(process: RedisProcess) -> UsageGuard:
    """api_calls failing open, ai_tokens failing closed."""
    return UsageGuard.from_url(
        process.url,
        plans=PLANS,
        default_plan="free",
        timeout=0.3,
        on_backend_error={"ai_tokens": "deny"},
    )


def requests_during_a_hang(
    get: Callable[[str, dict[str, str]], int], paused: Callable[[bool], None]
) -> list[int]:
    """One request per org before the hang, then during it one that the app refuses (its
    api_calls sent and timed out) and three served (the breaker: theirs never leave)."""
    refused, served = {"x-org-id": "refused"}, {"x-org-id": "served"}
    assert get("/ai", refused) == 200  # 1 api_call each
    assert get("/plain", served) == 200
    paused(True)
    try:
        return [get("/ai", refused)] + [get("/plain", served) for _ in range(3)]
    finally:
        paused(False)


def assert_refused_free_and_served_once(guard: UsageGuard, process: RedisProcess) -> None:
    """Each org made one request before the hang; "refused" one refused during it,
    "served" three served: once Redis has run and been told everything, 1 and 4."""
    period = guard.calls.time.now()[0]
    plain = redis.Redis(port=process.port, decode_responses=True)

    def api_calls(org: str) -> int:
        return int(plain.hget(KeySpace.of("ug", org).meters(period.key), "api_calls") or 0)

    wait_for(lambda: api_calls("served") >= 4, timeout=3, what="the served requests counted")
    time.sleep(0.5)  # and a late call, if any, run
    assert (api_calls("refused"), api_calls("served")) == (1, 4)
    plain.close()


@pytest.mark.real_redis
def test_a_request_refused_during_a_hang_is_not_charged_and_a_served_one_is_once(
    redis_process: RedisProcess, paused: Callable[[bool], None]
) -> None:
    guard = mixed_policy_guard(redis_process)
    with TestClient(guarded_app(guard)) as client:
        statuses = requests_during_a_hang(
            lambda path, headers: client.get(path, headers=headers).status_code, paused
        )
        assert client.portal is not None
        client.portal.call(guard.aio.aclose)
    guard.close()  # what the served requests owe lands (the settler's queue drains)
    assert statuses == [503, 200, 200, 200]
    assert_refused_free_and_served_once(guard, redis_process)


@pytest.mark.real_redis
def test_a_flask_request_served_during_a_hang_is_counted_once_and_a_refused_one_not(
    redis_process: RedisProcess, paused: Callable[[bool], None]
) -> None:
    guard = mixed_policy_guard(redis_process)
    app = Flask(__name__)
    UsageGuardFlask(app, guard=guard, identify=from_headers())

    @guard.metered("ai_tokens", 10)
    def generate() -> str:
        return "text"

    app.add_url_rule("/ai", "ai", generate)
    app.add_url_rule("/plain", "plain", lambda: "ok")
    client = app.test_client()
    statuses = requests_during_a_hang(
        lambda path, headers: client.get(path, headers=headers).status_code, paused
    )
    guard.close()
    assert statuses == [503, 200, 200, 200]
    assert_refused_free_and_served_once(guard, redis_process)
