"""@metered and ``with usage_guard.subject(...)``: functions, methods, sync and async."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import pytest

import usage_guard
from usage_guard import NotBound, Plan, UsageGuard, UsageLimitExceeded, metered

PLANS = {"free": Plan("free", {"ai_tokens": 100, "emails": 3, "contacts": 5})}


@pytest.fixture
def guard(make_guard: Callable[..., UsageGuard]) -> UsageGuard:
    return make_guard(plans=PLANS, default_plan="free")


def run_async(guard: UsageGuard, main: Callable[[], Any]) -> None:
    """Run ``main()`` on a fresh event loop, then close the async clients made on it."""

    async def wrapper() -> None:
        try:
            await main()
        finally:
            await guard.aio.aclose()

    asyncio.run(wrapper())


def used(guard: UsageGuard, metric: str, user: str | None = None) -> int:
    usage = guard.usage("acme", user)
    return usage.personal[metric].used if user else usage.meters[metric].used


@metered("emails")
def send(to: str) -> str:
    return f"sent to {to}"


@metered("ai_tokens", amount=lambda prompt, max_tokens=10: max_tokens)
async def summarize(prompt: str, max_tokens: int = 10) -> str:
    return prompt[:max_tokens]


class Mailer:
    def __init__(self) -> None:
        self.sent: list[str] = []

    @metered("emails", amount=lambda recipients: len(recipients))
    def broadcast(self, recipients: list[str]) -> int:
        self.sent += recipients
        return len(recipients)

    @metered("emails")
    async def send_async(self, to: str) -> str:
        self.sent.append(to)
        return to


def test_sync_function_counts_and_denies_without_running(guard: UsageGuard) -> None:
    with usage_guard.subject("acme", guard=guard):
        assert [send(f"u{i}") for i in range(3)] == ["sent to u0", "sent to u1", "sent to u2"]
        with pytest.raises(UsageLimitExceeded) as denied:
            send("u3")
    assert denied.value.decision.metric == "emails" and denied.value.decision.used == 3
    assert used(guard, "emails") == 3


def test_async_function_amount_from_the_call_arguments(guard: UsageGuard) -> None:
    async def run() -> None:
        with usage_guard.subject("acme", user="alice", guard=guard):
            assert await summarize("hello world", max_tokens=40) == "hello world"
            assert await summarize("abc") == "abc"

    run_async(guard, run)
    assert used(guard, "ai_tokens") == 50
    assert used(guard, "ai_tokens", "alice") == 50


def test_methods_sync_and_async_get_arguments_without_self(guard: UsageGuard) -> None:
    mailer = Mailer()
    with usage_guard.subject("acme", guard=guard.aio):  # the sync method uses its sync twin
        assert mailer.broadcast(["a", "b"]) == 2
        with pytest.raises(UsageLimitExceeded):
            mailer.broadcast(["c", "d"])

        async def send_async() -> None:
            assert await mailer.send_async("c") == "c"

        run_async(guard, send_async)
    assert mailer.sent == ["a", "b", "c"]
    assert used(guard, "emails") == 3


def test_signatures_and_coroutine_flags_survive() -> None:
    assert list(inspect.signature(summarize).parameters) == ["prompt", "max_tokens"]
    assert inspect.iscoroutinefunction(summarize)
    assert not inspect.iscoroutinefunction(send)
    assert inspect.iscoroutinefunction(Mailer().send_async)
    assert summarize.__name__ == "summarize"


def test_cost_reserves_the_amount_and_settles_to_the_result(guard: UsageGuard) -> None:
    @guard.metered("ai_tokens", amount=lambda n: n, cost=lambda text: len(text))
    def generate(n: int) -> str:
        return "x" * (n // 2)

    with usage_guard.subject("acme", user="alice"):
        assert generate(60) == "x" * 30
    assert used(guard, "ai_tokens") == 30
    with usage_guard.subject("acme", user="alice"), pytest.raises(UsageLimitExceeded):
        generate(80)  # 30 + 80 does not fit: the call never runs
    assert used(guard, "ai_tokens") == 30


def test_cost_without_amount_records_the_real_cost_past_the_cap(guard: UsageGuard) -> None:
    calls: list[int] = []

    @guard.metered("ai_tokens", cost=lambda tokens: tokens)
    async def chat(tokens: int) -> int:
        calls.append(tokens)
        return tokens

    async def run() -> None:
        with usage_guard.subject("acme"):
            assert await chat(99) == 99
            assert await chat(40) == 40  # one more token fitted; the real 40 are recorded
            with pytest.raises(UsageLimitExceeded):
                await chat(1)

    run_async(guard, run)
    assert calls == [99, 40]
    assert used(guard, "ai_tokens") == 139


def test_an_exception_in_the_call_cancels_the_reservation(guard: UsageGuard) -> None:
    @guard.metered("ai_tokens", amount=50, cost=len)
    def failing() -> str:
        raise TimeoutError("model timed out")

    with usage_guard.subject("acme"), pytest.raises(TimeoutError):
        failing()
    assert used(guard, "ai_tokens") == 0


def test_unknown_metric_fails_at_declaration_on_a_guard_and_at_first_call_otherwise(
    guard: UsageGuard,
) -> None:
    with pytest.raises(ValueError, match="sms"):
        guard.metered("sms")
    with pytest.raises(ValueError, match="sms"):
        guard.aio.metered("sms")

    @metered("sms")
    def text() -> None:
        raise AssertionError("never runs")

    with usage_guard.subject("acme", guard=guard), pytest.raises(ValueError, match="sms"):
        text()


def test_invalid_amounts_fail_at_declaration() -> None:
    with pytest.raises(ValueError):
        metered("emails", amount=-1)
    with pytest.raises(ValueError):
        metered("emails", cost=3)  # type: ignore[arg-type]


def test_no_bound_guard_or_subject_is_a_clear_error(guard: UsageGuard) -> None:
    with pytest.raises(NotBound, match="no usage guard is bound"):
        send("x")
    with pytest.raises(NotBound, match="no subject is bound"):
        guard.metered("emails")(lambda: None)()


def test_subject_blocks_nest_and_restore(guard: UsageGuard) -> None:
    assert usage_guard.current_subject() is None
    with usage_guard.subject("acme", user="alice", guard=guard) as outer:
        assert outer == usage_guard.Subject("acme", "alice")
        with usage_guard.subject("globex"):  # keeps the enclosing guard
            send("x")
        assert usage_guard.current_subject() == outer
    assert usage_guard.current_subject() is None
    assert guard.usage("globex").meters["emails"].used == 1


def test_a_bound_async_guard_serves_async_calls_through_its_async_side(
    guard: UsageGuard,
) -> None:
    seen: list[Any] = []

    async def run() -> None:
        with usage_guard.subject("acme", guard=guard.aio):
            seen.append(await summarize("x", max_tokens=5))

    run_async(guard, run)
    assert seen == ["x"] and used(guard, "ai_tokens") == 5
