"""A finished call never fails because accounting failed: settles meet outages in the
background, exactly once."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import RedisProcess, wait_for
from usage_guard import Plan, UsageGuard, metered, settling, subject

PLANS = {"free": Plan("free", {"ai_tokens": 1_000})}


def counter(server: RedisProcess) -> int:
    with redis.Redis(port=server.port) as plain:
        [key] = plain.keys("ug:{acme}:c:ai_tokens:*")
        return int(plain.get(key) or 0)


@pytest.mark.parametrize("side", ["sync", "async"])
def test_a_cost_settled_during_an_outage_returns_the_result_and_lands_once(
    tmp_path: Path, side: str
) -> None:
    server = RedisProcess(tmp_path)
    guard = UsageGuard.from_url(server.url, plans=PLANS, default_plan="free", timeout=0.3)

    def pause_redis() -> dict[str, int]:
        # The LLM answered, and Redis hangs just as the cost is settled.
        os.kill(server.process.pid, signal.SIGSTOP)
        return {"tokens": 40}

    @metered("ai_tokens", amount=100, cost=lambda result: result["tokens"])
    def complete() -> dict[str, int]:
        return pause_redis()

    @metered("ai_tokens", amount=100, cost=lambda result: result["tokens"])
    async def acomplete() -> dict[str, int]:
        return pause_redis()

    async def on_the_async_side() -> Any:
        # No aclose(): it would wait for the settle; the loop's shutdown closes the connection.
        with subject("acme", guard=guard):
            return await acomplete()

    try:
        with subject("acme", guard=guard):
            result = complete() if side == "sync" else asyncio.run(on_the_async_side())
        assert result == {"tokens": 40}
        assert guard.settler.pending == 1
        os.kill(server.process.pid, signal.SIGCONT)
        wait_for(lambda: guard.settler.pending == 0, what="the settle to land")
        # Exactly the actual cost: the timed-out attempt and the retry settle it once.
        assert counter(server) == 40
        assert guard.engine.failures.unsettled == 0
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        guard.close()
        server.stop()


def test_close_gives_up_after_its_timeout_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisProcess(tmp_path)
    guard = UsageGuard.from_url(server.url, plans=PLANS, default_plan="free", timeout=0.2)
    reservation = guard.reserve("acme", "ai_tokens", 100)
    server.stop()
    assert reservation.settle(10) is True  # queued
    assert reservation.cancel() is True  # queued too; whichever lands first wins
    with caplog.at_level(logging.ERROR, logger="usage_guard"):
        guard.close(settle_timeout=0.3)
    assert guard.engine.failures.unsettled == 2 and guard.settler.pending == 0
    assert any("could not reach Redis" in r.getMessage() for r in caplog.records)


def test_the_queue_is_bounded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settling, "QUEUE_SIZE", 2)
    server = RedisProcess(tmp_path)
    guard = UsageGuard.from_url(server.url, plans=PLANS, default_plan="free", timeout=0.2)
    reservations = [guard.reserve("acme", "ai_tokens", 10) for _ in range(3)]
    server.stop()
    with caplog.at_level(logging.ERROR, logger="usage_guard"):
        for reservation in reservations:
            reservation.settle(1)
    assert (guard.settler.pending, guard.engine.failures.unsettled) == (2, 1)
    assert any("dropped" in r.getMessage() for r in caplog.records)
    guard.close(settle_timeout=0)
