"""What a user's type checker sees: checked by ``mypy --strict`` (``[tool.mypy] files``),
never run. An ``assert_type`` that no longer holds, or a ``# type: ignore[code]`` that
no longer silences an error (``warn_unused_ignores``), fails the check."""

from __future__ import annotations

from typing import assert_type

from usage_guard import (
    AsyncReservation,
    AsyncUsageGuard,
    Decision,
    Observer,
    OpenTelemetryObserver,
    Reservation,
    Stats,
    UsageGuard,
    metered,
)
from usage_guard.decision import Scope

guard = UsageGuard.from_url("memory://", timeout=0.5, reservation_ttl=60)


# -- decorated functions keep their signatures ------------------------------------------


@guard.metered("emails")
def send(to: str, *, copies: int = 1) -> bool:
    return bool(to) and copies > 0


assert_type(send("ada@example.com", copies=2), bool)
send(42)  # type: ignore[arg-type]
send("ada@example.com", copies="2")  # type: ignore[arg-type]


@guard.aio.metered("ai_tokens", amount=lambda prompt: len(prompt), cost=lambda reply: len(reply))
async def complete(prompt: str) -> str:
    return prompt


async def use_complete() -> None:
    assert_type(await complete("hello"), str)
    await complete(42)  # type: ignore[arg-type]


@metered("enrichments")
def enrich(company: str) -> dict[str, str]:
    return {"company": company}


assert_type(enrich("acme"), dict[str, str])


class Mailer:
    @guard.metered("emails", amount=lambda batch: len(batch))
    def send_batch(self, batch: list[str]) -> int:
        return len(batch)


assert_type(Mailer().send_batch(["ada@example.com"]), int)
Mailer().send_batch("ada@example.com")  # type: ignore[arg-type]


# -- a metric name takes an amount; a mapping carries its own ---------------------------

assert_type(guard.consume("acme", "emails", 3, user="ada"), Decision)
assert_type(guard.check("acme", {"emails": 1, "contacts": 2}), Decision)
guard.consume("acme", {"emails": 1}, 5)  # type: ignore[call-overload]
guard.reserve("acme", {"emails": 1}, 5)  # type: ignore[call-overload]
guard.release("acme", {"contacts": 1}, 5)  # type: ignore[call-overload]
assert_type(guard.reserve("acme", "ai_tokens", 4000, ttl=120), Reservation)
assert_type(guard.reserve("acme", "ai_tokens", 4000).settle(3120), bool)


# -- the async twin takes the same typed options ----------------------------------------

AsyncUsageGuard.from_url("memory://", timeout=0.5, reservation_ttl=60, prefix="billing")
AsyncUsageGuard.from_url("memory://", timeout="slow")  # type: ignore[arg-type]
AsyncUsageGuard.from_url("memory://", timeot=1)  # type: ignore[call-arg]
UsageGuard.from_url("memory://", timeot=1)  # type: ignore[call-arg]


async def reserve_async(aguard: AsyncUsageGuard) -> None:
    reservation = await aguard.reserve("acme", "ai_tokens", 100, user="ada", ttl=60)
    assert_type(reservation, AsyncReservation)
    assert_type(await reservation.settle(80), bool)
    assert_type(await aguard.consume("acme", {"emails": 1, "contacts": 1}), Decision)
    await aguard.check("acme", {"emails": 1}, 2)  # type: ignore[call-overload]


# -- instrumentation: observers are typed, stats are a snapshot --------------------------


class Denials(Observer):
    def __init__(self) -> None:
        self.denied = 0

    def decision(self, metric: str, scope: Scope, allowed: bool) -> None:
        self.denied += not allowed


assert_type(guard.observe(Denials()), Denials)
assert_type(guard.aio.observe(OpenTelemetryObserver()), OpenTelemetryObserver)
guard.observe(lambda metric: None)  # type: ignore[type-var]


class Misspelt(Observer):
    def decision(self, metric: str, scope: Scope, allowed: str) -> None:  # type: ignore[override]
        pass


assert_type(guard.stats(), Stats)
assert_type(guard.aio.stats(), Stats)  # the same snapshot, not a coroutine
assert_type(guard.stats().backend_errors_by_class["TimeoutError"], int)
guard.stats().backend_errors = 0  # type: ignore[misc]
