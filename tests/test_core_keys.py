"""The Redis key layout of DESIGN.md section 6, read back with plain redis clients."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from conftest import raw_client
from usage_guard import InvalidUsage, Plan, UsageGuard
from usage_guard.keys import KeySpace, decode_id, encode_id
from usage_guard.scripts import SOURCES

MakeGuard = Callable[..., UsageGuard]
PLANS = {
    "free": Plan("free", {"emails": 10, "ai_tokens": 1000, "contacts": 10}),
    "pro": Plan("pro", {"emails": 100}),
}
# The monthly keys of November 2026 leave the 6-month history window when May 2027 starts.
NOVEMBER_KEYS_EXPIRE = datetime(2027, 5, 1, tzinfo=timezone.utc)


@pytest.fixture
def guard(make_guard: MakeGuard) -> UsageGuard:
    return make_guard(plans=PLANS, default_plan="free")


def keys_of(guard: UsageGuard) -> set[str]:
    client = raw_client(guard)
    pattern = f"{guard.calls.prefix}:*"
    if isinstance(client, redis.RedisCluster):
        found = client.scan_iter(match=pattern, target_nodes=redis.RedisCluster.ALL_NODES)
    else:
        found = client.scan_iter(match=pattern)
    return set(found)


def seconds_until(moment: datetime, clock: Callable[[], datetime]) -> float:
    return (moment - clock()).total_seconds()


def assert_ttl(client: Any, key: str, expected: float) -> None:
    # Real Redis counts the TTL down in real time while the test runs.
    assert expected - 5 <= client.ttl(key) <= expected


def test_every_key_has_its_documented_name_type_and_ttl(guard: UsageGuard, clock: Any) -> None:
    guard.assign_plan("acme", "pro")
    guard.set_limit("acme", "contacts", 50)
    guard.set_budget("acme", "alice", "ai_tokens", 100)
    guard.consume("acme", "emails", 3, idempotency_key="req-1")
    guard.consume("acme", {"ai_tokens": 90, "contacts": 45}, user="alice")
    reservation = guard.reserve("acme", "emails", 2, user="alice")
    guard.consume("acme", "enrichments", 4, user="bob")
    p = guard.calls.prefix
    client = raw_client(guard)
    # An open reservation holds its estimate apart from the counters until its deadline.
    entry = f"r:{reservation.ticket.id}\tc:emails:2026-11=2"
    expected = {
        f"{p}:{{acme}}:org": (
            "hash",
            {
                "plan": "pro",
                "limit:contacts": "50",
                "reservations:due": str(reservation.ticket.deadline),
            },
        ),
        f"{p}:{{acme}}:budgets": ("hash", {"alice:ai_tokens": "100"}),
        f"{p}:{{acme}}:c:emails:2026-11": ("string", "3"),
        f"{p}:{{acme}}:c:ai_tokens:2026-11": ("string", "90"),
        f"{p}:{{acme}}:c:enrichments:2026-11": ("string", "4"),
        f"{p}:{{acme}}:u:alice:ai_tokens:2026-11": ("string", "90"),
        f"{p}:{{acme}}:u:bob:enrichments:2026-11": ("string", "4"),
        f"{p}:{{acme}}:g:contacts": ("string", "45"),
        f"{p}:{{acme}}:h:contacts": ("hash", {"2026-11": "45"}),
        f"{p}:{{acme}}:t:2026-11": ("hash", {"contacts": "90"}),
        f"{p}:{{acme}}:r:{reservation.ticket.id}": ("string", entry),
        f"{p}:{{acme}}:reservations": ("zset", [(entry, reservation.ticket.deadline)]),
        f"{p}:{{acme}}:held": ("hash", {"c:emails:2026-11": "2"}),
    }
    idempotency = f"{p}:{{acme}}:idem:req-1"
    assert keys_of(guard) == {*expected, idempotency}
    for key, (kind, value) in expected.items():
        assert client.type(key) == kind, key
        if kind == "zset":
            stored: Any = client.zrange(key, 0, -1, withscores=True)
        else:
            stored = client.hgetall(key) if kind == "hash" else client.get(key)
        assert stored == value, key
    window_end = seconds_until(NOVEMBER_KEYS_EXPIRE, clock)
    for key in expected:
        if ":c:" in key or ":u:" in key or ":t:" in key or ":r" in key or ":held" in key:
            assert_ttl(client, key, window_end)
        else:
            assert client.ttl(key) == -1, key  # org data and cumulative meters never expire
    assert client.type(idempotency) == "string"
    assert_ttl(client, idempotency, 86400)


def test_ttls_follow_the_injected_clock(guard: UsageGuard, clock: Any) -> None:
    clock.set(2026, 6, 30, 23, 59, 59)
    guard.consume("acme", "emails", 1)
    key = f"{guard.calls.prefix}:{{acme}}:c:emails:2026-06"
    assert_ttl(
        raw_client(guard), key, seconds_until(datetime(2026, 12, 1, tzinfo=timezone.utc), clock)
    )


def test_history_months_sets_how_long_monthly_keys_live(make_guard: MakeGuard, clock: Any) -> None:
    guard = make_guard(plans=PLANS, history_months=2)
    guard.consume("acme", "emails", 1)
    key = f"{guard.calls.prefix}:{{acme}}:c:emails:2026-11"
    assert_ttl(
        raw_client(guard), key, seconds_until(datetime(2027, 1, 1, tzinfo=timezone.utc), clock)
    )
    assert len(guard.usage("acme").periods) == 2


def test_cumulative_history_keeps_only_the_window(make_guard: MakeGuard, clock: Any) -> None:
    guard = make_guard(plans=PLANS, history_months=3)
    for month in range(1, 8):
        clock.set(2026, month, 15)
        guard.set_usage("acme", "storage", month)
    history = raw_client(guard).hgetall(f"{guard.calls.prefix}:{{acme}}:h:storage")
    assert history == {"2026-05": "5", "2026-06": "6", "2026-07": "7"}


ODD_IDS = [
    ("a{b}:c d%é", "a%7Bb%7D%3Ac%20d%25%C3%A9"),
    ("{acme}", "%7Bacme%7D"),
    ("alice@example.com", "alice@example.com"),
    ("user_1.x-y", "user_1.x-y"),
    ("漢字", "%E6%BC%A2%E5%AD%97"),
    ("%41", "%2541"),
]


@pytest.mark.parametrize(("identifier", "encoded"), ODD_IDS)
def test_ids_are_percent_encoded_into_keys(
    guard: UsageGuard, identifier: str, encoded: str
) -> None:
    assert encode_id(identifier) == encoded and decode_id(encoded) == identifier
    guard.consume(identifier, "ai_tokens", 7, user=identifier)
    p = guard.calls.prefix
    assert keys_of(guard) == {
        f"{p}:{{{encoded}}}:c:ai_tokens:2026-11",
        f"{p}:{{{encoded}}}:u:{encoded}:ai_tokens:2026-11",
    }
    assert guard.usage(identifier, user=identifier).personal["ai_tokens"].used == 7


def test_ids_that_look_alike_never_share_a_counter(guard: UsageGuard) -> None:
    orgs = ["a:b", "a%3Ab", "a b", "a+b", "A:b", "{a}:b", "a}:{b"]
    for n, org in enumerate(orgs, start=1):
        guard.consume(org, "emails", n)
    assert [guard.usage(org).meters["emails"].used for org in orgs] == list(range(1, 8))
    users = ["x:ai_tokens", "x", "x%3Aai_tokens"]
    for n, user in enumerate(users, start=1):
        guard.set_budget("acme", user, "ai_tokens", n)
        guard.consume("acme", "ai_tokens", n, user=user)
    for n, user in enumerate(users, start=1):
        assert guard.usage("acme", user=user).personal["ai_tokens"].used == n
        assert guard.usage("acme", user=user).personal["ai_tokens"].budget == n


def test_every_key_of_an_org_is_in_its_hash_slot(guard: UsageGuard) -> None:
    org = "tenant {42}: ü"
    guard.set_budget(org, "bob:1", "ai_tokens", 50)
    guard.consume(org, {"ai_tokens": 5, "contacts": 2}, user="bob:1", idempotency_key="k:{1}")
    guard.reserve(org, "emails", 1)
    names = keys_of(guard)
    tag = "{" + encode_id(org) + "}"
    assert len(names) == 10
    assert all(name.count("{") == name.count("}") == 1 and tag in name for name in names)
    assert len({key_slot(name.encode()) for name in names}) == 1


def test_the_prefix_is_configurable(make_guard: MakeGuard) -> None:
    guard = make_guard(plans=PLANS, prefix="billing7")
    guard.consume("acme", "emails")
    assert keys_of(guard) == {"billing7:{acme}:c:emails:2026-11"}
    for bad in ("", "a:b", "{x}", "a b"):
        with pytest.raises(InvalidUsage):
            make_guard(prefix=bad)


def test_the_default_prefix_is_ug() -> None:
    guard = UsageGuard.from_url("memory://")
    guard.consume("acme", "emails")
    assert raw_client(guard).keys("*") == [
        f"ug:{{acme}}:c:emails:{datetime.now(timezone.utc):%Y-%m}"
    ]
    assert KeySpace("ug", "acme").org == "ug:{acme}:org"


@pytest.mark.real_redis
@pytest.mark.parametrize("storage_url", ["redis"], indirect=True)
def test_a_plain_redis_client_reads_the_counters(guard: UsageGuard) -> None:
    guard.set_budget("acme", "alice", "ai_tokens", 100)
    guard.consume("acme", "ai_tokens", 42, user="alice")
    guard.set_usage("acme", "storage", 10_485_760)
    p = guard.calls.prefix
    with redis.Redis.from_url(os.environ["USAGE_GUARD_REDIS_URL"], decode_responses=True) as cli:
        # What `redis-cli GET 'ug:{acme}:c:ai_tokens:2026-11'` and friends show an operator.
        assert cli.get(f"{p}:{{acme}}:c:ai_tokens:2026-11") == "42"
        assert cli.get(f"{p}:{{acme}}:u:alice:ai_tokens:2026-11") == "42"
        assert cli.hget(f"{p}:{{acme}}:budgets", "alice:ai_tokens") == "100"
        assert cli.get(f"{p}:{{acme}}:g:storage") == "10485760"
        assert cli.hgetall(f"{p}:{{acme}}:h:storage") == {"2026-11": "10485760"}


def script_commands() -> set[str]:
    """Every command the Lua scripts call: Redis 7 counts those in commandstats too."""
    return {
        f"cmdstat_{name.lower()}"
        for source in SOURCES.values()
        for name in re.findall(r"redis\.call\('(\w+)'", source)
    }


def command_counts(client: redis.Redis) -> dict[str, int]:
    return {name: stats["calls"] for name, stats in client.info("commandstats").items()}


def test_one_consumption_is_one_evalsha(redis_process: Any) -> None:
    guard = UsageGuard.from_url(redis_process.url, plans=PLANS, default_plan="free")
    guard.consume("acme", {"ai_tokens": 1, "contacts": 1}, user="alice")  # loads the script
    with redis.Redis(port=redis_process.port) as observer:
        before = command_counts(observer)
        for _ in range(5):
            guard.consume("acme", {"ai_tokens": 1, "contacts": 1}, user="alice")
            guard.consume("acme", "emails", 1, idempotency_key="one")
        guard.check("acme", "emails", 1)
        after = command_counts(observer)
    guard.close()
    delta = {name: calls - before.get(name, 0) for name, calls in after.items()}
    changed = {name for name, calls in delta.items() if calls}
    assert delta["cmdstat_evalsha"] == 11
    assert changed - script_commands() == {"cmdstat_evalsha", "cmdstat_info"}


def snapshot(guard: UsageGuard) -> dict[str, tuple[Any, bool]]:
    """Every key of the guard with its value and whether it expires."""
    client = raw_client(guard)
    return {
        key: (
            client.hgetall(key) if client.type(key) == "hash" else client.get(key),
            client.ttl(key) > 0,
        )
        for key in keys_of(guard)
    }


def test_a_denied_consumption_leaves_every_key_as_it_was(make_guard: MakeGuard) -> None:
    # Consumption counts first and takes back on denial: nothing of that may show.
    limits = {"emails": 10, "contacts": 10, "ai_tokens": 1000, "import_rows": 1000}
    guard = make_guard(
        plans={"free": Plan("free", {**limits, "enrichments": 0})}, default_plan="free"
    )
    guard.consume("acme", "emails", 9)
    guard.consume("acme", "contacts", 4)
    guard.set_budget("acme", "alice", "ai_tokens", 10)
    before = snapshot(guard)
    denials = [
        guard.consume("acme", "enrichments", 5, user="alice"),  # limit 0, no key yet
        guard.consume("acme", {"emails": 1, "import_rows": 2000}),  # the second is over
        guard.consume("acme", {"import_rows": 1, "emails": 2}),  # a new key, then a denial
        guard.consume("acme", "ai_tokens", 50, user="alice"),  # over her budget
        guard.consume("acme", "ai_tokens", 5000, user="bob"),  # over the org's limit
        guard.consume("acme", "contacts", 20),  # cumulative, over 110 %
    ]
    assert [(d.allowed, d.metric, d.scope, d.used) for d in denials] == [
        (False, "enrichments", "organization", 0),
        (False, "import_rows", "organization", 0),
        (False, "emails", "organization", 9),
        (False, "ai_tokens", "personal", 0),
        (False, "ai_tokens", "organization", 0),
        (False, "contacts", "organization", 4),
    ]
    assert snapshot(guard) == before


def test_one_reading_of_the_clock_per_call_even_across_midnight_on_the_1st(
    make_guard: MakeGuard,
) -> None:
    # A clock that moves on each reading, across 00:00Z on Dec 1: the period and the TTL
    # of one call must come from the same instant.
    readings = [datetime(2026, 11, 30, 23, 59, 59, 999_000, tzinfo=timezone.utc)]

    def ticking() -> datetime:
        readings.append(readings[-1] + timedelta(milliseconds=2))
        return readings[-2]

    guard = make_guard(plans=PLANS, default_plan="free", clock=ticking)
    decision = guard.consume("acme", "emails")
    assert len(readings) == 2  # read once
    assert decision.resets_at == datetime(2026, 12, 1, tzinfo=timezone.utc)
    key = f"{guard.calls.prefix}:{{acme}}:c:emails:2026-11"
    ttl = raw_client(guard).ttl(key)
    # November's counter lives until May 2027 starts, counted from 23:59:59.999 Nov 30.
    expected = (datetime(2027, 5, 1, tzinfo=timezone.utc) - readings[0]).total_seconds()
    assert abs(ttl - expected) <= 2
