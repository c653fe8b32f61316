"""A counter that holds no integer (an operator's HSET typo, a key of another type) is
reported by name, and nothing is half applied: on memory://, Redis and the Cluster."""

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


def spoil(guard: UsageGuard, key: str, field: str) -> None:
    """One counter holds text: a letter O typed for a zero."""
    raw_client(guard).hset(key, field, "12O")


def replace(guard: UsageGuard, key: str) -> None:
    """A hash of counters becomes a key of another type."""
    plain: Any = raw_client(guard)
    plain.delete(key)
    plain.set(key, "12O")


def test_a_consumption_of_several_metrics_is_all_or_nothing_even_then(guard: UsageGuard) -> None:
    month = keys(guard).meters(PERIOD)
    guard.consume("acme", "contacts", 3)
    spoil(guard, keys(guard).org, "contacts")
    with pytest.raises(CorruptedCounter) as raised:
        guard.consume("acme", {"emails": 5, "contacts": 1})
    assert (raised.value.key, raised.value.field) == (keys(guard).org, "contacts")
    assert f"{keys(guard).org} field contacts" in str(raised.value)
    # emails was counted first, then taken back: its count was never left behind.
    assert raw_client(guard).hmget(month, "emails", "contacts") == [None, "3"]
    with pytest.raises(CorruptedCounter):
        guard.check("acme", {"emails": 1, "contacts": 1})


def test_a_month_of_another_type_takes_back_what_the_call_counted(guard: UsageGuard) -> None:
    # The month's hash is not even a hash: contacts, counted first in the org's hash,
    # is taken back.
    month = keys(guard).meters(PERIOD)
    guard.consume("acme", "contacts", 3)
    replace(guard, month)
    with pytest.raises(CorruptedCounter) as raised:
        guard.consume("acme", {"contacts": 1, "emails": 5})
    assert raised.value.key == month
    assert raw_client(guard).hget(keys(guard).org, "contacts") == "3"
    assert raw_client(guard).get(month) == "12O"
    with pytest.raises(CorruptedCounter):
        guard.check("acme", {"contacts": 1, "emails": 1})


def test_a_spoiled_personal_counter_leaves_the_org_counter_as_it_was(guard: UsageGuard) -> None:
    guard.consume("acme", "ai_tokens", 10, user="alice")
    mine = keys(guard).personal(PERIOD)
    spoil(guard, mine, "alice:ai_tokens")
    with pytest.raises(CorruptedCounter, match="alice") as raised:
        guard.consume("acme", "ai_tokens", 5, user="alice")
    assert (raised.value.key, raised.value.field) == (mine, "alice:ai_tokens")
    assert guard.usage("acme").meters["ai_tokens"].used == 10


def test_settling_and_releasing_change_nothing_when_one_counter_is_spoiled(
    guard: UsageGuard,
) -> None:
    reservation = guard.reserve("acme", {"emails": 5, "contacts": 2})
    spoil(guard, keys(guard).org, "contacts")
    # The work ran: settling never raises; it is given up, counted, and changes nothing.
    assert reservation.settle({"emails": 1, "contacts": 1}) is False
    assert guard.failures.unsettled == 1
    assert raw_client(guard).hget(keys(guard).held, f"m:{PERIOD}:emails") == "5"
    assert raw_client(guard).hget(keys(guard).meters(PERIOD), "emails") is None
    with pytest.raises(CorruptedCounter):
        guard.release("acme", "contacts", 1)
    # The Usage page names the counter too, instead of failing on int().
    with pytest.raises(CorruptedCounter, match="contacts"):
        guard.usage("acme")


def test_the_usage_page_names_a_spoiled_monthly_count(guard: UsageGuard) -> None:
    guard.consume("acme", "emails", 4)
    month = keys(guard).meters(PERIOD)
    spoil(guard, month, "emails")  # HSET ug:{acme}:m:2026-11 emails 12O
    with pytest.raises(CorruptedCounter) as raised:
        guard.usage("acme")
    assert (raised.value.key, raised.value.field) == (month, "emails")


def test_a_check_names_a_personal_hash_of_another_type(guard: UsageGuard) -> None:
    guard.consume("acme", "ai_tokens", 10, user="alice")
    mine = keys(guard).personal(PERIOD)
    replace(guard, mine)
    with pytest.raises(CorruptedCounter) as raised:
        guard.check("acme", "ai_tokens", 1, user="alice")
    assert (raised.value.key, raised.value.field) == (mine, None)  # the key as a whole


def test_usage_names_a_month_hash_of_another_type(guard: UsageGuard) -> None:
    """An operator's ``SET`` over a month's hash: the Usage page names the key, as a
    consumption does, instead of reporting Redis as down."""
    guard.consume("acme", "emails", 3)
    key = keys(guard).meters(PERIOD)
    raw_client(guard).set(key, "x")
    for read in (lambda: guard.usage("acme"), lambda: guard.consume("acme", "emails", 1)):
        with pytest.raises(CorruptedCounter) as raised:
            read()
        assert (raised.value.key, raised.value.field) == (key, None)
