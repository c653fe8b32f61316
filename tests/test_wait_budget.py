"""Time: one wait budget per request (every call of the library within one request, the
middleware's, require(), @metered and rate limits, waits for Redis at most ``timeout`` in
all; settling finished work is exempt) and a breaker per node."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi import Depends, FastAPI
from flask import Flask
from redis.crc import key_slot
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
)
from starlette.testclient import TestClient

from cluster import Cluster
from conftest import RedisProcess, self_signed, wait_for
from usage_guard import Decision, Plan, Subject, UsageGuard
from usage_guard.asgi import from_headers
from usage_guard.context import Budget, bind, unbind
from usage_guard.fastapi import install
from usage_guard.flask import UsageGuardFlask
from usage_guard.redispy import _Nodes
from usage_guard.runtime import PROBE_INTERVAL, Breaker

TIMEOUT = 1.0
PLANS = {
    "free": Plan(
        "free",
        {"api_calls": 1000, "emails": 1000, "ai_tokens": 10_000},
        rate_limits={"api_calls": "100/second"},
    )
}
ACME = {"x-org-id": "acme"}


def test_a_call_past_the_requests_budget_is_answered_by_the_policy_at_once(
    make_guard: Callable[..., UsageGuard],
) -> None:
    guard = make_guard(plans=PLANS, default_plan="free", on_backend_error={"emails": "deny"})
    reservation = guard.reserve("acme", "ai_tokens", 500)
    spent = Budget()
    spent.deadline = time.monotonic() - 0.001
    token = bind(Subject("acme"), guard, spent)
    try:
        assert guard.consume("acme", "emails").scope == "unavailable"  # fail-closed: denied
        assert not guard.consume("acme", "emails").allowed
        assert guard.failures.backend_errors == 2
        # Settling finished work is exempt: it has its own timeout.
        assert reservation.settle(300) is True
    finally:
        unbind(token)
    assert guard.usage("acme").meters["ai_tokens"].used == 300
    assert guard.usage("acme").meters["emails"].used == 0


def fastapi_app(guard: UsageGuard) -> FastAPI:
    app = FastAPI()
    install(app, guard=guard, identify=from_headers())

    @guard.aio.metered("ai_tokens", 10)
    async def complete() -> str:
        return "done"

    @app.post("/complete", dependencies=[Depends(guard.require("emails"))])
    async def endpoint() -> dict[str, Any]:
        return {"text": await complete()}

    return app


def flask_app(guard: UsageGuard) -> Flask:
    app = Flask(__name__)
    UsageGuardFlask(app, guard=guard, identify=from_headers())

    @guard.metered("emails")
    def send() -> str:
        return "sent"

    @guard.metered("ai_tokens", 10)
    def complete() -> str:
        return "done"

    @app.post("/complete")
    def endpoint() -> dict[str, Any]:
        return {"sent": send(), "text": complete()}

    return app


def timed(request: Callable[[], Any]) -> tuple[float, Any]:
    started = time.monotonic()
    response = request()
    return time.monotonic() - started, response


def test_an_asgi_request_waits_at_most_the_timeout_in_all(
    redis_process: RedisProcess, paused: Callable[[], None]
) -> None:
    """Middleware (rate limit + api_calls), require() and @metered: four calls."""
    guard = UsageGuard.from_url(
        redis_process.url, plans=PLANS, default_plan="free", timeout=TIMEOUT
    )
    with TestClient(fastapi_app(guard)) as client:
        assert client.post("/complete", headers=ACME).status_code == 200
        paused()
        elapsed, response = timed(lambda: client.post("/complete", headers=ACME))
        assert client.portal is not None
        client.portal.call(guard.aio.aclose)
    assert response.status_code == 200  # fail-open: served, unmetered
    assert elapsed < TIMEOUT + 0.5, elapsed
    guard.close(timeout=0)


def test_a_flask_request_waits_at_most_the_timeout_in_all(
    redis_process: RedisProcess, paused: Callable[[], None]
) -> None:
    """The extension (rate limit + api_calls) and two @metered calls in the view."""
    guard = UsageGuard.from_url(
        redis_process.url, plans=PLANS, default_plan="free", timeout=TIMEOUT
    )
    client = flask_app(guard).test_client()
    assert client.post("/complete", headers=ACME).status_code == 200
    paused()
    elapsed, response = timed(lambda: client.post("/complete", headers=ACME))
    assert response.status_code == 200
    assert elapsed < TIMEOUT + 0.5, elapsed
    guard.close(timeout=0)


def late_call_app(guard: UsageGuard, hang: Callable[[], None]) -> Flask:
    """A view that uses most of its request's time, then meets a hung server."""
    app = Flask(__name__)
    UsageGuardFlask(app, guard=guard, identify=from_headers())

    @guard.metered("emails")
    def send() -> str:
        return "sent"

    @app.post("/send")
    def endpoint() -> str:
        time.sleep(0.6 * TIMEOUT)
        hang()
        return send()

    return app


def late_call_waits(url: str, owner: RedisProcess) -> None:
    """redis-py's sync clients fix their socket timeout per connection: the request's
    later call must still give up when the request's time is spent."""
    guard = UsageGuard.from_url(url, plans=PLANS, default_plan="free", timeout=TIMEOUT)
    client = late_call_app(guard, lambda: os.kill(owner.process.pid, signal.SIGSTOP))
    try:
        elapsed, response = timed(lambda: client.test_client().post("/send", headers=ACME))
    finally:
        os.kill(owner.process.pid, signal.SIGCONT)
    assert response.status_code == 200  # fail-open: served, unmetered
    assert elapsed < TIMEOUT + 0.3, elapsed  # not 0.6 s and a whole timeout more
    guard.close(timeout=0)


def test_redis_pys_sync_client_waits_no_longer_than_the_request_has_left(
    redis_process: RedisProcess,
) -> None:
    late_call_waits(redis_process.url + "?client=redis-py", redis_process)


@pytest.mark.cluster
def test_a_sync_cluster_client_waits_no_longer_than_the_request_has_left(
    tmp_path: Path,
) -> None:
    cluster = Cluster(tmp_path, node_timeout_ms=15_000)
    try:
        late_call_waits(cluster.url(), cluster.master_of(key_slot(b"acme")))
    finally:
        cluster.stop()


@pytest.mark.real_redis
def test_a_sync_tls_cluster_client_waits_no_longer_than_the_request_has_left(
    tmp_path: Path,
) -> None:
    """A one-node Cluster speaking TLS only: redis-py's own TLS class must not replace the
    budgeted one."""
    cert, key = self_signed(tmp_path)
    node = RedisProcess(
        tmp_path / "node",
        *("--cluster-enabled", "yes", "--cluster-config-file", str(tmp_path / "nodes.conf")),
        *("--tls-cert-file", str(cert), "--tls-key-file", str(key)),
        *("--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--tls-cluster", "yes"),
        tls=True,
    )
    try:
        admin = redis.Redis(port=node.port, ssl=True, ssl_cert_reqs="none")
        admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)  # type: ignore[no-untyped-call]
        wait_for(lambda: admin.cluster("info")["cluster_state"] == "ok", what="the cluster")
        admin.close()
        late_call_waits(f"rediss+cluster://127.0.0.1:{node.port}?ssl_cert_reqs=none", node)
    finally:
        node.stop()


@pytest.mark.cluster
def test_an_asgi_request_on_a_cluster_waits_at_most_the_timeout_in_all(tmp_path: Path) -> None:
    """The node owning the org's slot hangs: redis-py's async cluster client, four calls."""
    cluster = Cluster(tmp_path)
    try:
        guard = UsageGuard.from_url(
            cluster.url(), plans=PLANS, default_plan="free", timeout=TIMEOUT
        )
        with TestClient(fastapi_app(guard)) as client:
            assert client.post("/complete", headers=ACME).status_code == 200
            owner = cluster.master_of(key_slot(b"acme"))
            os.kill(owner.process.pid, signal.SIGSTOP)
            try:
                elapsed, response = timed(lambda: client.post("/complete", headers=ACME))
            finally:
                os.kill(owner.process.pid, signal.SIGCONT)
            # Answered after the calls given up on: those have their replies by then.
            assert client.post("/complete", headers=ACME).status_code == 200
            assert client.portal is not None
            client.portal.call(guard.aio.aclose)
        assert response.status_code == 200
        assert elapsed < TIMEOUT + 0.5, elapsed
        guard.close(timeout=0)
    finally:
        cluster.stop()


# -- a breaker per node -----------------------------------------------------------------


def test_a_hung_server_costs_one_timeout_then_calls_fail_fast_until_a_probe_answers(
    redis_process: RedisProcess, paused: Callable[[], None]
) -> None:
    guard = UsageGuard.from_url(redis_process.url, plans=PLANS, default_plan="free", timeout=0.5)
    assert guard.consume("acme", "emails").allowed
    paused()
    first, decision = timed(lambda: guard.consume("acme", "emails"))
    assert decision.scope == "unavailable" and first >= 0.5
    rest, decisions = timed(lambda: [guard.consume("acme", "emails") for _ in range(20)])
    assert {d.scope for d in decisions} == {"unavailable"}
    assert rest < 0.4, rest  # at most one probe (0.5 s after the failure) waited
    assert guard.failures.backend_errors == 21  # every call the policy answered, counted
    os.kill(redis_process.process.pid, signal.SIGCONT)
    time.sleep(PROBE_INTERVAL)
    assert guard.consume("acme", "emails").scope == "organization"  # the probe answered
    assert guard.consume("acme", "emails").scope == "organization"
    guard.close(timeout=0)


def test_at_most_one_probe_is_in_flight(
    redis_process: RedisProcess, paused: Callable[[], None]
) -> None:
    guard = UsageGuard.from_url(redis_process.url, plans=PLANS, default_plan="free", timeout=0.5)

    async def calls() -> list[float]:
        aio = guard.aio
        await aio.consume("acme", "emails")
        paused()
        await aio.consume("acme", "emails")  # opens the breaker
        await asyncio.sleep(PROBE_INTERVAL)

        async def one() -> float:
            started = time.monotonic()
            assert (await aio.consume("acme", "emails")).scope == "unavailable"
            return time.monotonic() - started

        waits = await asyncio.gather(*(one() for _ in range(10)))
        await aio.aclose()
        return waits

    waits = asyncio.run(calls())
    assert sum(wait >= 0.4 for wait in waits) == 1, waits  # the probe; the rest failed fast
    guard.close(timeout=0)


def orgs_by_master(cluster: Cluster) -> dict[int, str]:
    """One org per master, by the master's port."""
    found: dict[int, str] = {}
    for n in range(1000):
        org = f"org{n}"
        found.setdefault(cluster.master_of(key_slot(f"{{{org}}}".encode())).port, org)
        if len(found) == len(cluster.masters()):
            return found
    raise LookupError("an org per master")


HUNG_TIMEOUT = 0.5


@pytest.mark.cluster
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_hung_cluster_master_costs_its_orgs_one_timeout_and_the_others_nothing(
    tmp_path: Path, flavour: str
) -> None:
    # The others do not declare it failed meanwhile (that would stop the whole cluster).
    cluster = Cluster(tmp_path, node_timeout_ms=15_000)
    try:
        guard = UsageGuard.from_url(
            cluster.url(), plans=PLANS, default_plan="free", timeout=HUNG_TIMEOUT
        )
        orgs = orgs_by_master(cluster)
        victim = cluster.masters()[0]
        hung, healthy = orgs[victim.port], [o for p, o in orgs.items() if p != victim.port]
        calls: list[tuple[str, float, Decision]] = []

        async def scenario() -> None:
            aio = guard.aio
            for org in orgs.values():
                assert (await aio.consume(org, "emails")).scope == "organization"
                assert guard.consume(org, "emails").scope == "organization"
            os.kill(victim.process.pid, signal.SIGSTOP)
            try:
                # 3 s of calls, alternating between the hung master's org and the others.
                until = time.monotonic() + 3
                while time.monotonic() < until:
                    for org in [hung, *healthy]:
                        started = time.monotonic()
                        if flavour == "sync":
                            decision = guard.consume(org, "emails")
                        else:
                            decision = await aio.consume(org, "emails")
                        calls.append((org, time.monotonic() - started, decision))
                        await asyncio.sleep(0.01)
            finally:
                os.kill(victim.process.pid, signal.SIGCONT)
            await aio.aclose()

        asyncio.run(scenario())
        guard.close(timeout=0)
    finally:
        cluster.stop()
    on_hung = [(wait, d.scope) for org, wait, d in calls if org == hung]
    on_healthy = [(wait, d.scope) for org, wait, d in calls if org != hung]
    assert {scope for _, scope in on_hung} == {"unavailable"}
    # One timeout, then at most one probe per timeout + interval: the rest fail fast.
    waited = [wait for wait, _ in on_hung if wait >= HUNG_TIMEOUT * 0.8]
    assert len(waited) <= 1 + 3 / (HUNG_TIMEOUT + PROBE_INTERVAL), on_hung
    assert len(on_hung) > 2 * len(waited)
    # The other masters' orgs never noticed.
    assert {scope for _, scope in on_healthy} == {"organization"}, on_healthy
    assert max(wait for wait, _ in on_healthy) < HUNG_TIMEOUT / 2, on_healthy


def test_a_probe_that_never_ends_cannot_hold_the_breaker_open() -> None:
    breaker = Breaker(timeout=0.05, interval=0.05)
    breaker.failed()
    assert not breaker.admits()
    time.sleep(0.06)
    assert breaker.admits()  # the probe, cancelled before it could say how it went
    assert not breaker.admits()  # never two in flight
    time.sleep(0.11)
    assert breaker.admits()  # its time is over: another probe
    breaker.answered()
    assert breaker.admits() and breaker.admits()


def test_a_call_past_its_budget_does_not_use_up_the_probe(
    make_guard: Callable[..., UsageGuard],
) -> None:
    guard = make_guard(plans=PLANS, default_plan="free")
    breaker = guard.runtime.breaker = Breaker(timeout=1.0, interval=0.0)
    breaker.failed()
    spent = Budget()
    spent.deadline = time.monotonic() - 0.001
    token = bind(Subject("acme"), guard, spent)
    try:
        assert guard.consume("acme", "emails").scope == "unavailable"
    finally:
        unbind(token)
    assert guard.consume("acme", "emails").scope == "organization"  # the probe, answered
    assert not breaker.open


@pytest.mark.cluster
def test_closing_a_cluster_guard_right_after_a_failure_closes_its_connections(
    cluster_url: str,
) -> None:
    guard = UsageGuard.from_url(cluster_url, plans=PLANS, default_plan="free")

    async def scenario() -> None:
        await guard.aio.consume("acme", "emails")
        # As a failed call leaves redis-py's client until the next call: due to rediscover.
        scripts = await guard.backend.aio()._current()  # type: ignore[attr-defined]
        scripts.client._initialize = True
        await guard.aio.aclose()

    asyncio.run(scenario())
    guard.close()
    gc.collect()  # an unclosed connection warns here, and the warning fails the test


def test_a_cluster_nodes_breaker_opens_on_silence_not_on_error_replies() -> None:
    """CLUSTERDOWN during a failover is the whole cluster's for a moment, and an error
    reply costs no wait: neither may refuse a node's orgs until a probe."""
    breakers: dict[str, Breaker] = {}
    nodes = _Nodes(None, clocks=False, breaker_of=None)
    nodes._breaker_of = lambda name: breakers.setdefault(name, Breaker(0.5, node=name))
    replies = [
        ClusterDownError("The cluster is down"),
        TryAgainError("Multiple keys request during rehashing of slot"),
        ReadOnlyError("You can't write against a read only replica."),
        BusyLoadingError("Redis is loading the dataset in memory"),
        OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
    ]
    for n, reply in enumerate(replies):
        nodes.failed(f"replied{n}", reply, 1.0)
    nodes.failed("silent", redis.TimeoutError("Timeout reading from socket"), 0.5)
    nodes.failed("gone", redis.ConnectionError("Connection refused"), 0.0)
    # A timeout after a sliver of wait: the call's own time ran out, not the node's.
    nodes.failed("cut short", redis.TimeoutError("Timeout reading from socket"), 0.01)
    assert {name for name, breaker in breakers.items() if breaker.open} == {"silent", "gone"}


def test_a_failure_after_a_redirect_is_the_node_that_was_reached() -> None:
    """redis-py follows a MOVED by itself: the timeout belongs to the node it names on the
    error, not to the one the call was sent to."""
    breakers: dict[str, Breaker] = {}
    nodes = _Nodes(None, clocks=False, breaker_of=None)
    nodes._breaker_of = lambda name: breakers.setdefault(name, Breaker(0.5, node=name))
    timeout = redis.TimeoutError("Timeout reading from socket")
    timeout.connection = redis.cluster.ClusterNode("127.0.0.1", 7001)  # type: ignore[attr-defined,no-untyped-call]
    nodes.failed("127.0.0.1:7000", timeout, 0.5)
    lost = redis.ConnectionError("Connection reset")
    lost.connection = redis.connection.Connection(host="127.0.0.1", port=7002)  # type: ignore[attr-defined,no-untyped-call]
    nodes.failed("127.0.0.1:7000", lost, 0.0)
    assert {name for name, breaker in breakers.items() if breaker.open} == {
        "127.0.0.1:7001",
        "127.0.0.1:7002",
    }


@pytest.mark.cluster
def test_a_sync_call_on_a_cluster_whose_masters_all_hang_waits_one_timeout_at_most(
    tmp_path: Path,
) -> None:
    """redis-py rediscovers inside a failing call, a timeout per node; a refused call's
    rediscovery runs off the request's thread."""
    cluster = Cluster(tmp_path, node_timeout_ms=15_000)
    masters = cluster.masters()
    try:
        guard = UsageGuard.from_url(cluster.url(), plans=PLANS, default_plan="free", timeout=0.3)
        orgs = [f"org{n}" for n in range(6)]
        for org in orgs:
            assert guard.consume(org, "emails").allowed
        for master in masters:
            os.kill(master.process.pid, signal.SIGSTOP)
        try:
            waits = [timed(partial(guard.consume, org, "emails"))[0] for org in orgs * 2]
        finally:
            for master in masters:
                os.kill(master.process.pid, signal.SIGCONT)
        assert max(waits) < 0.3 + 0.15, waits
        guard.close(timeout=0)
    finally:
        cluster.stop()
