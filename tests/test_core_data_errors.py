"""A counter that holds no integer (an operator's SET typo, another type) is reported by
name, and nothing is half applied: on memory://, Redis and the Cluster."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from conftest import raw_client
from usage_guard import CorruptedCounter, Plan, UsageGuard
from usage_guard.keys import KeySpace

PLANS = {"free": Plan("free", {"emails": 100, "ai_tokens": 1_000, "contacts": 100})}
PERIOD = "2026-11"  # the test clock's month


@pytest.fixture
def guard(make_guard: Callable[..., UsageGuard]) -> UsageGuard:
    return make_guard(plans=PLANS, default_plan="free")


def keys(guard: UsageGuard) -> KeySpace:
    return KeySpace.of(guard.calls.prefix, "acme")


def spoil(guard: UsageGuard, key: str, how: str) -> None:
    plain: Any = raw_client(guard)
    plain.delete(key)
    if how == "text":
        plain.set(key, "12O")  # a letter O typed for a zero
    else:
        plain.hset(key, "wrong", "type")


@pytest.mark.parametrize("how", ["text", "hash"])
def test_a_consumption_of_several_metrics_is_all_or_nothing_even_then(
    guard: UsageGuard, how: str
) -> None:
    emails, contacts = keys(guard).counter("emails", PERIOD), keys(guard).gauge("contacts")
    guard.consume("acme", "contacts", 3)
    spoil(guard, contacts, how)
    with pytest.raises(CorruptedCounter) as raised:
        guard.consume("acme", {"emails": 5, "contacts": 1})
    assert raised.value.key == contacts
    plain: Any = raw_client(guard)
    # emails was counted first, then taken back: its counter was never left behind.
    assert plain.exists(emails) == 0
    with pytest.raises(CorruptedCounter):
        guard.check("acme", {"emails": 1, "contacts": 1})


def test_a_spoiled_personal_counter_leaves_the_org_counter_as_it_was(guard: UsageGuard) -> None:
    guard.consume("acme", "ai_tokens", 10, user="alice")
    mine = keys(guard).personal("alice", "ai_tokens", PERIOD)
    spoil(guard, mine, "text")
    with pytest.raises(CorruptedCounter, match="alice"):
        guard.consume("acme", "ai_tokens", 5, user="alice")
    assert guard.usage("acme").meters["ai_tokens"].used == 10


def test_settling_and_releasing_change_nothing_when_one_counter_is_spoiled(
    guard: UsageGuard,
) -> None:
    reservation = guard.reserve("acme", {"emails": 5, "contacts": 2})
    spoil(guard, keys(guard).gauge("contacts"), "text")
    # The work ran: settling never raises; it is given up, counted, and changes nothing.
    assert reservation.settle({"emails": 1, "contacts": 1}) is False
    assert guard.failures.unsettled == 1
    assert raw_client(guard).hget(keys(guard).held, f"c:emails:{PERIOD}") == "5"
    assert raw_client(guard).get(keys(guard).counter("emails", PERIOD)) is None
    with pytest.raises(CorruptedCounter):
        guard.release("acme", "contacts", 1)
    # The Usage page names the key too, instead of failing on int().
    with pytest.raises(CorruptedCounter, match="contacts"):
        guard.usage("acme")


def test_a_check_names_a_spoiled_personal_counter(guard: UsageGuard) -> None:
    guard.consume("acme", "ai_tokens", 10, user="alice")
    spoil(guard, keys(guard).personal("alice", "ai_tokens", PERIOD), "hash")
    with pytest.raises(CorruptedCounter, match="alice"):
        guard.check("acme", "ai_tokens", 1, user="alice")
