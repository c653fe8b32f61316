"""Bad input is refused with a ValueError subclass before Redis is touched."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from conftest import raw_client
from usage_guard import (
    InvalidAmount,
    InvalidIdentifier,
    InvalidUsage,
    Plan,
    UnknownMetric,
    UnknownPlan,
    UsageGuard,
    UsageGuardError,
)
from usage_guard.keys import MAX_ID_LENGTH

MakeGuard = Callable[..., UsageGuard]
PLANS = {"free": Plan("free", {"emails": 10, "ai_tokens": 100, "storage": 50})}
MAX = 2**53 - 1

BAD_AMOUNTS = [-1, 1.0, 0.5, True, False, 2**53, "1", None, float("nan")]
BAD_IDS = ["", "x" * (MAX_ID_LENGTH + 1), 123, b"acme", ("acme",), "\ud800"]
Operation = Callable[[UsageGuard], object]


def bad_amount_calls(amount: Any) -> list[Operation]:
    return [
        lambda g: g.consume("acme", "emails", amount),
        lambda g: g.consume("acme", {"emails": 1, "ai_tokens": amount}),
        lambda g: g.check("acme", "emails", amount),
        lambda g: g.reserve("acme", "ai_tokens", amount),
        lambda g: g.release("acme", "storage", amount),
        lambda g: g.set_usage("acme", "storage", amount),
    ]


def bad_id_calls(identifier: Any) -> list[Operation]:
    return [
        lambda g: g.consume(identifier, "emails"),
        lambda g: g.consume("acme", "ai_tokens", user=identifier),
        lambda g: g.consume("acme", "emails", idempotency_key=identifier),
        lambda g: g.check(identifier, "emails"),
        lambda g: g.reserve("acme", "ai_tokens", 1, user=identifier),
        lambda g: g.release(identifier, "storage"),
        lambda g: g.set_limit(identifier, "emails", 3),
        lambda g: g.set_budget("acme", identifier, "ai_tokens", 3),
        lambda g: g.assign_plan(identifier, "free"),
        lambda g: g.usage(identifier),
        lambda g: g.usage("acme", user=identifier),
    ]


# None is a valid user and idempotency key ("none"), never a valid organization.
NO_ORG_CALLS: list[Operation] = [
    lambda g: g.consume(None, "emails"),  # type: ignore[call-overload]
    lambda g: g.reserve(None, "emails", 1),  # type: ignore[call-overload]
    lambda g: g.set_budget("acme", None, "ai_tokens", 1),  # type: ignore[arg-type]
    lambda g: g.usage(None),  # type: ignore[arg-type]
]

BAD_METRIC_CALLS: list[Operation] = [
    lambda g: g.consume("acme", "sms"),
    lambda g: g.consume("acme", {"emails": 1, "sms": 1}),
    lambda g: g.consume("acme", {}),
    lambda g: g.consume("acme", 5),  # type: ignore[call-overload]
    lambda g: g.consume("acme", ["emails"]),  # type: ignore[call-overload]
    lambda g: g.check("acme", "Emails"),
    lambda g: g.reserve("acme", "sms", 1),
    lambda g: g.release("acme", "sms"),
    lambda g: g.release("acme", "emails"),
    lambda g: g.set_usage("acme", "emails", 1),
    lambda g: g.set_limit("acme", "sms", 1),
    lambda g: g.set_limit("acme", "emails", -1),
    lambda g: g.set_limit("acme", "emails", 2**53),
    lambda g: g.remove_limit("acme", "sms"),
    lambda g: g.set_budget("acme", "alice", "emails", 1),
    lambda g: g.set_budget("acme", "alice", "ai_tokens", 1.5),  # type: ignore[arg-type]
    lambda g: g.assign_plan("acme", "gold"),
]


def invalid_calls() -> list[Any]:
    calls = [
        pytest.param(call, InvalidAmount, id=f"amount-{amount!r}-{n}")
        for amount in BAD_AMOUNTS
        for n, call in enumerate(bad_amount_calls(amount))
    ]
    calls += [
        pytest.param(call, InvalidIdentifier, id=f"id-{str(identifier)[:8]!r}-{n}")
        for identifier in BAD_IDS
        for n, call in enumerate(bad_id_calls(identifier))
    ]
    calls += [
        pytest.param(call, InvalidIdentifier, id=f"org-None-{n}")
        for n, call in enumerate(NO_ORG_CALLS)
    ]
    calls += [
        pytest.param(call, InvalidUsage, id=f"metric-{n}")
        for n, call in enumerate(BAD_METRIC_CALLS)
    ]
    return calls


def test_the_error_classes_are_value_errors() -> None:
    for error in (InvalidUsage, InvalidAmount, InvalidIdentifier, UnknownMetric, UnknownPlan):
        assert issubclass(error, ValueError) and issubclass(error, UsageGuardError)


@pytest.mark.parametrize(("call", "error"), invalid_calls())
def test_bad_input_never_reaches_an_unreachable_backend(
    call: Operation, error: type[Exception]
) -> None:
    # Port 1 refuses connections: had the guard sent anything, the outage policy would answer.
    guard = UsageGuard.from_url("redis://127.0.0.1:1/0", plans=PLANS, default_plan="free")
    with pytest.raises(error):
        call(guard)
    assert guard.failures.backend_errors == 0
    guard.close()


def stored(guard: UsageGuard) -> dict[str, Any]:
    """Every key of the guard's prefix with its value."""
    client = raw_client(guard)
    return {
        key: client.hgetall(key) if client.type(key) == "hash" else client.get(key)
        for key in client.keys(f"{guard.calls.prefix}:*")
    }


def run_invalid_calls(guard: UsageGuard) -> None:
    for param in invalid_calls():
        call, error = param.values
        with pytest.raises(error):
            call(guard)


def test_bad_input_writes_nothing_and_leaves_counters_unchanged(make_guard: MakeGuard) -> None:
    guard = make_guard(plans=PLANS, default_plan="free")
    run_invalid_calls(guard)
    assert stored(guard) == {}
    guard.consume("acme", {"emails": 4, "ai_tokens": 7}, user="alice")
    guard.set_usage("acme", "storage", 9)
    guard.set_budget("acme", "alice", "ai_tokens", 50)
    before = stored(guard)
    run_invalid_calls(guard)
    assert stored(guard) == before


def test_the_largest_values_are_accepted(make_guard: MakeGuard) -> None:
    guard = make_guard(plans=PLANS)
    guard.set_limit("acme", "emails", MAX)
    assert guard.consume("acme", "emails", MAX).allowed
    assert not guard.consume("acme", "emails", 1).allowed
    assert guard.consume("a" * MAX_ID_LENGTH, "ai_tokens", 1, user="u" * MAX_ID_LENGTH).allowed
    guard.set_usage("acme", "storage", MAX)
    assert guard.usage("acme").meters["storage"].used == MAX


@pytest.mark.parametrize(
    "options",
    [
        {"plans": {"free": Plan("free", {"sms": 1})}},
        {"plans": {"paid": Plan("free", {})}},
        {"plans": PLANS, "default_plan": "gold"},
        {"on_backend_error": "maybe"},
        {"on_backend_error": {"sms": "deny"}},
        {"history_months": 0},
        {"prefix": "a:b"},
    ],
)
def test_bad_configuration_is_refused(options: dict[str, Any]) -> None:
    with pytest.raises(InvalidUsage):
        UsageGuard.from_url("memory://", **options)


@pytest.mark.parametrize("limits", [{"emails": -1}, {"emails": 1.5}, {"emails": True}])
def test_bad_plan_limits_are_refused(limits: dict[str, Any]) -> None:
    with pytest.raises(InvalidAmount):
        Plan("free", limits)


def test_a_mapping_of_metrics_takes_no_separate_amount(make_guard: MakeGuard) -> None:
    guard = make_guard(plans=PLANS, default_plan="free")
    for call in (guard.consume, guard.check, guard.reserve):
        with pytest.raises(InvalidUsage, match="mapping"):
            call("acme", {"emails": 1}, 5)  # type: ignore[call-overload]
    assert guard.usage("acme").meters["emails"].used == 0
