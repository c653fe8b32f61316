"""Redis down, unreachable or back: on_backend_error decides, nothing hangs, recovery is
automatic."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import RedisProcess
from usage_guard import BackendUnavailable, Decision, Plan, UsageGuard, UsageLimitExceeded
from usage_guard.runtime import PROBE_INTERVAL

PLANS = {"free": Plan("free", {"emails": 10, "ai_tokens": 1000})}
TIMEOUT = 0.2


def outage_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.ERROR and "unavailable" in r.msg]


def test_a_stopped_server_is_allowed_by_default_logged_once_and_counted(
    redis_process: Any, caplog: pytest.LogCaptureFixture
) -> None:
    guard = UsageGuard.from_url(redis_process.url, plans=PLANS, default_plan="free")
    assert guard.consume("acme", "emails").scope == "organization"
    redis_process.stop()
    with caplog.at_level(logging.WARNING, logger="usage_guard"):
        decisions = [guard.consume("acme", "emails", 100) for _ in range(3)]
    assert all(d.allowed and d.scope == "unavailable" for d in decisions)
    assert decisions[0].resets_at is not None and decisions[0].remaining is None
    assert guard.failures.backend_errors == 3
    assert len(outage_errors(caplog)) == 1
    with pytest.raises(BackendUnavailable):
        guard.usage("acme")
    with pytest.raises(BackendUnavailable):
        guard.set_limit("acme", "emails", 5)
    reservation = guard.reserve("acme", "ai_tokens", 5)
    assert reservation.decision.scope == "unavailable"
    assert reservation.settle(5) is False and reservation.cancel() is False
    guard.close()


def test_deny_and_per_metric_policies(redis_process: Any) -> None:
    url = redis_process.url
    closed = UsageGuard.from_url(url, plans=PLANS, on_backend_error="deny")
    mixed = UsageGuard.from_url(url, plans=PLANS, on_backend_error={"ai_tokens": "deny"})
    redis_process.stop()
    denied = closed.consume("acme", "emails")
    assert (denied.allowed, denied.scope, denied.metric) == (False, "unavailable", "emails")
    with pytest.raises(UsageLimitExceeded):
        denied.raise_for_status()
    assert mixed.consume("acme", "emails").allowed
    assert not mixed.consume("acme", "ai_tokens").allowed
    both = mixed.consume("acme", {"emails": 1, "ai_tokens": 1})
    assert (both.allowed, both.metric, both.scope) == (False, "ai_tokens", "unavailable")
    closed.close()
    mixed.close()


class Blackhole:
    """A local socket that accepts connections and never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    hole = Blackhole()
    yield hole
    hole.close()


def test_an_unanswering_server_gives_up_after_the_timeout(blackhole: Blackhole) -> None:
    guard = UsageGuard.from_url(
        f"redis://127.0.0.1:{blackhole.port}/0",
        plans=PLANS,
        on_backend_error="deny",
        timeout=TIMEOUT,
    )
    answers: list[Decision] = []
    worker = threading.Thread(target=lambda: answers.append(guard.consume("acme", "emails")))
    worker.start()
    worker.join(timeout=5 * TIMEOUT + 5)  # only a guard against hanging the suite
    assert not worker.is_alive()
    assert [(d.allowed, d.scope) for d in answers] == [(False, "unavailable")]
    guard.close()


def test_the_async_guard_gives_up_after_the_timeout_too(blackhole: Blackhole) -> None:
    guard = UsageGuard.from_url(
        f"redis://127.0.0.1:{blackhole.port}/0", plans=PLANS, timeout=TIMEOUT
    )

    async def scenario() -> Decision:
        try:
            return await asyncio.wait_for(guard.aio.consume("acme", "emails"), 5 * TIMEOUT + 5)
        finally:
            await guard.aio.aclose()

    decision = asyncio.run(scenario())
    assert (decision.allowed, decision.scope) == (True, "unavailable")
    assert guard.failures.backend_errors == 1


def test_the_guard_recovers_when_redis_is_back(
    redis_process: Any, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    guard = UsageGuard.from_url(redis_process.url, plans=PLANS, default_plan="free")
    guard.consume("acme", "emails", 3)
    caplog.set_level(logging.WARNING, logger="usage_guard")
    redis_process.stop()
    assert guard.consume("acme", "emails").scope == "unavailable"
    replacement = RedisProcess(tmp_path, port=redis_process.port)
    try:
        time.sleep(PROBE_INTERVAL)  # the breaker lets the next call probe the server
        # A new, empty server: the script is loaded again (NOSCRIPT) and counting restarts.
        back = guard.consume("acme", "emails", 2)
        assert (back.allowed, back.scope, back.used) == (True, "organization", 2)
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        replacement.stop()
        assert guard.consume("acme", "emails").scope == "unavailable"
        assert len(outage_errors(caplog)) == 1  # at most one a minute
    finally:
        replacement.stop()
        guard.close()
