"""A finished call never fails because accounting failed: settles meet outages in the
background, exactly once."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import RedisProcess, raw_client, wait_for
from usage_guard import BackendUnavailable, Plan, UsageGuard, metered, settling, subject
from usage_guard import failures as failures_module
from usage_guard.keys import KeySpace
from usage_guard.settling import Settler

PLANS = {"free": Plan("free", {"ai_tokens": 1_000})}


def counter(server: RedisProcess) -> int:
    """acme's ai_tokens of the one month its meters were written in."""
    with redis.Redis(port=server.port) as plain:
        [month] = plain.keys("ug:{acme}:m:*")
        return int(plain.hget(month, "ai_tokens") or 0)


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
        assert guard.failures.unsettled == 0
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        guard.close()
        server.stop()


def test_close_gives_up_after_its_timeout_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisProcess(tmp_path)
    guard = UsageGuard.from_url(server.url, plans=PLANS, default_plan="free", timeout=0.2)
    settled, cancelled = (
        guard.reserve("acme", "ai_tokens", 100),
        guard.reserve("acme", "ai_tokens", 1),
    )
    server.stop()
    assert settled.settle(10) is True  # queued
    assert cancelled.cancel() is True  # queued too
    with caplog.at_level(logging.ERROR, logger="usage_guard"):
        guard.close(timeout=0.3)
    assert guard.failures.unsettled == 2 and guard.settler.pending == 0
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
    assert (guard.settler.pending, guard.failures.unsettled) == (2, 1)
    assert any("dropped" in r.getMessage() for r in caplog.records)
    guard.close(timeout=0)


def outage() -> BackendUnavailable:
    unavailable = BackendUnavailable("down")
    unavailable.__cause__ = redis.ConnectionError("refused")
    return unavailable


def test_a_settle_that_fails_for_a_bug_is_given_up_not_retried(
    make_guard: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = make_guard(plans=PLANS, default_plan="free")
    reservation = guard.reserve("acme", "ai_tokens", 100)
    plain = raw_client(guard)
    month = KeySpace.of(guard.calls.prefix, "acme").meters(reservation.ticket.period.key)
    plain.hset(month, "ai_tokens", "typo")  # an operator's HSET: no integer for the script
    monkeypatch.setattr(failures_module.Failures, "reraise_unexpected", False)
    assert reservation.settle(1) is False
    assert (guard.settler.pending, guard.failures.unsettled) == (0, 1)


def test_one_settle_that_keeps_failing_holds_up_no_other() -> None:
    landed: list[str] = []

    def run(call: str) -> None:
        if call == "on a dead node":
            raise outage()
        landed.append(call)

    settler = Settler(run, failures_module.Failures())
    settler.defer("on a dead node")
    settler.defer("on a healthy node")
    wait_for(lambda: landed == ["on a healthy node"], what="the healthy settle")
    assert settler.drain(0) == 1


def test_close_waits_for_the_attempt_in_flight_and_counts_only_what_did_not_land() -> None:
    failures = failures_module.Failures()
    started = threading.Event()

    def slow_then_lands(call: str) -> None:
        started.set()
        time.sleep(0.3)

    settler = Settler(slow_then_lands, failures)
    settler.defer("settle")
    started.wait()
    assert settler.drain(0) == 0 and failures.unsettled == 0 and settler.pending == 0


def test_a_forked_child_starts_with_no_queued_settles() -> None:
    def always_down(call: str) -> None:
        raise outage()

    settler = Settler(always_down, failures_module.Failures())
    settler.defer("settle")
    pid = os.fork()
    if pid == 0:  # the child: nothing queued, nothing retried
        os._exit(0 if settler.pending == 0 and settler._thread is None else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert settler.pending == 1
    settler.drain(0)


def test_the_process_exit_drains_what_is_queued_and_says_what_was_lost() -> None:
    script = """
import logging
from redis import ConnectionError
from usage_guard import BackendUnavailable, failures, settling
logging.basicConfig()
settling.EXIT_TIMEOUT = 0.2
def down(call):
    raise BackendUnavailable("down") from ConnectionError("refused")
settling.Settler(down, failures.Failures()).defer("settle")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0
    assert "1 settles or cancels could not reach Redis" in done.stderr
