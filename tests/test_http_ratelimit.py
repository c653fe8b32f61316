"""Short-window plan rate limits (a moving window, in the guard's storage) in the middleware
and Flask."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from conftest import raw_client
from usage_guard import Plan, UsageGuard, UsageGuardMiddleware
from usage_guard.asgi import from_headers
from usage_guard.flask import UsageGuardFlask
from usage_guard.keys import KeySpace
from usage_guard.ratelimit import RateLimits

PLANS = {
    "free": Plan("free", {"api_calls": 1000}, rate_limits={"api_calls": "3/minute"}),
    "pro": Plan("pro", {"api_calls": 1000}),
}
ACME = {"x-org-id": "acme"}


@pytest.fixture
def guard(make_guard: Callable[..., UsageGuard]) -> UsageGuard:
    return make_guard(plans=PLANS, default_plan="free")


def asgi_app(guard: UsageGuard) -> UsageGuardMiddleware:
    async def index(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return UsageGuardMiddleware(
        Starlette(routes=[Route("/", index)]), guard=guard, identify=from_headers()
    )


def test_middleware_answers_429_with_retry_after_past_the_rate(guard: UsageGuard) -> None:
    app = asgi_app(guard)
    assert app.rate_limits is not None
    with TestClient(app) as client:
        assert [client.get("/", headers=ACME).status_code for _ in range(3)] == [200] * 3
        limited = client.get("/", headers=ACME)
        other_org = client.get("/", headers={"x-org-id": "globex"})
        assert client.portal is not None
        client.portal.call(guard.aio.aclose)
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    # Named apart from the monthly quota of the same metric ("api_calls").
    assert limited.headers["ratelimit-policy"] == '"api_calls-60s";q=3;w=60'
    assert limited.headers["ratelimit"].startswith('"api_calls-60s";r=0;t=')
    assert limited.json()["violated-policies"] == ["api_calls-60s"]
    body = limited.json()
    assert (body["metric"], body["scope"], body["limit"]) == ("api_calls", "rate", 3)
    assert other_org.status_code == 200
    # A rate-limited request counts nothing against the monthly quota.
    assert guard.usage("acme").meters["api_calls"].used == 3


def test_flask_extension_enforces_the_plan_rate_and_plans_without_one_are_free(
    guard: UsageGuard,
) -> None:
    app = Flask(__name__)
    extension = UsageGuardFlask(app, guard=guard, identify=from_headers())
    app.get("/")(lambda: "ok")
    client = app.test_client()
    assert [client.get("/", headers=ACME).status_code for _ in range(4)] == [200] * 3 + [429]
    guard.assign_plan("initech", "pro")
    initech = {"x-org-id": "initech"}
    assert {client.get("/", headers=initech).status_code for _ in range(5)} == {200}
    assert extension.metering(app).rate_limits is not None


def test_rate_limits_are_off_when_no_plan_declares_any(
    make_guard: Callable[..., UsageGuard],
) -> None:
    plain = make_guard(plans={"free": Plan("free", {})}, default_plan="free")
    assert not RateLimits(plain).configured
    assert asgi_app(plain).rate_limits is None


@pytest.mark.real_redis
def test_rate_limits_fail_open_when_redis_is_down(
    redis_process: Any, serve: Callable[..., TestClient]
) -> None:
    guard = UsageGuard.from_url(redis_process.url, plans=PLANS, default_plan="free", timeout=0.2)
    app = asgi_app(guard)
    assert app.rate_limits is not None
    client = serve(app, guard)
    assert client.get("/", headers=ACME).status_code == 200
    redis_process.stop()
    # Neither the short-window limits nor the monthly quota can be asked: the quota's
    # policy (allow, by default) decides, and nothing answers a 500.
    assert [client.get("/", headers=ACME).status_code for _ in range(5)] == [200] * 5
    assert guard.failures.backend_errors >= 5
    guard.close()


def test_a_plan_change_applies_to_the_next_request_and_keys_are_the_orgs(
    guard: UsageGuard,
) -> None:
    limits = RateLimits(guard)
    assert [limits.hit("acme", ["api_calls"]) is None for _ in range(4)] == [True] * 3 + [False]
    guard.assign_plan("acme", "pro")  # no rate limit: read in the same call, nothing cached
    assert limits.hit("acme", ["api_calls"]) is None
    # An assignment left from a plan no longer configured: the default plan's limits.
    raw_client(guard).hset(KeySpace(guard.calls.prefix, "acme").org, "plan", "legacy")
    assert limits.hit("acme", ["api_calls"]) is not None
    assert limits.hit("acme", ["emails"]) is None  # no limit on that metric: no call at all
    window = KeySpace(guard.calls.prefix, "acme").rate("api_calls", 60)
    assert raw_client(guard).llen(window) == 3
    assert 0 < raw_client(guard).pttl(window) <= 60_000


def test_all_limits_of_a_request_count_or_none(make_guard: Callable[..., UsageGuard]) -> None:
    plans = {
        "free": Plan("free", {}, rate_limits={"api_calls": "5/minute", "emails": "2/minute;3/hour"})
    }
    limits = RateLimits(make_guard(plans=plans, default_plan="free"))
    assert limits.hit("acme", ["api_calls", "emails"]) is None
    assert limits.hit("acme", ["api_calls", "emails"]) is None
    denied = limits.hit("acme", ["api_calls", "emails"])  # emails' 2/minute
    assert denied is not None and b'"emails-60s"' in denied.body
    assert [limits.hit("acme", ["api_calls"]) is None for _ in range(4)] == [True] * 3 + [False]


@pytest.mark.real_redis
def test_a_hung_redis_holds_a_rate_limited_request_no_longer_than_the_timeout(
    redis_process: Any,
) -> None:
    timeout = 0.3
    plans = {"free": Plan("free", {"api_calls": 1000}, rate_limits={"api_calls": "100/minute"})}
    guard = UsageGuard.from_url(
        redis_process.url, plans=plans, default_plan="free", timeout=timeout
    )
    limits = RateLimits(guard)
    assert limits.hit("acme", ["api_calls"]) is None

    async def ahit() -> Any:
        try:
            return await limits.ahit("acme", ["api_calls"])
        finally:
            await guard.aio.aclose()

    assert asyncio.run(ahit()) is None
    os.kill(redis_process.process.pid, signal.SIGSTOP)
    try:
        for hit in (lambda: limits.hit("acme", ["api_calls"]), lambda: asyncio.run(ahit())):
            started = time.monotonic()
            assert hit() is None  # fails open: the monthly quota's policy decides
            assert time.monotonic() - started < timeout + 0.5
    finally:
        os.kill(redis_process.process.pid, signal.SIGCONT)
    assert guard.failures.backend_errors == 2
    guard.close()
