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
    base = f"{guard.calls.prefix}:{{acme}}:"
    client = raw_client(guard)
    # An open reservation holds its estimate apart from the counters until its deadline.
    entry = f"r:{reservation.ticket.id}\tm:2026-11:emails=2"
    window_end = seconds_until(NOVEMBER_KEYS_EXPIRE, clock)
    never = None
    # key -> (type, value, TTL until it leaves the history window; never: no TTL)
    expected: dict[str, tuple[str, Any, float | None]] = {
        base + "org": (
            "hash",
            {
                "plan": "pro",
                "limit:contacts": "50",
                "reservations:due": str(reservation.ticket.deadline),
                "contacts": "45",  # a cumulative meter's value now
            },
            never,
        ),
        base + "budgets": ("hash", {"alice:ai_tokens": "100"}, never),
        base + "m:2026-11": (
            "hash",
            {
                "emails": "3",
                "ai_tokens": "90",
                "enrichments": "4",
                "contacts": "45",  # a cumulative meter's last value this month
                "t:contacts": "90",  # the highest threshold emitted this month
            },
            window_end,
        ),
        base + "u:2026-11": ("hash", {"alice:ai_tokens": "90", "bob:enrichments": "4"}, window_end),
        base + f"r:{reservation.ticket.id}": ("string", entry, window_end),
        base + "reservations": ("zset", [(entry, reservation.ticket.deadline)], window_end),
        base + "held": ("hash", {"m:2026-11:emails": "2"}, window_end),
    }
    idempotency = base + "idem:req-1"
    assert keys_of(guard) == {*expected, idempotency}
    for key, (kind, value, ttl) in expected.items():
        assert client.type(key) == kind, key
        if kind == "zset":
            stored: Any = client.zrange(key, 0, -1, withscores=True)
        else:
            stored = client.hgetall(key) if kind == "hash" else client.get(key)
        assert stored == value, key
        if ttl is never:
            assert client.ttl(key) == -1, key  # org data never expires
        else:
            assert_ttl(client, key, ttl)
    assert client.type(idempotency) == "string"
    assert_ttl(client, idempotency, 86400)


def test_ttls_follow_the_injected_clock(guard: UsageGuard, clock: Any) -> None:
    clock.set(2026, 6, 30, 23, 59, 59)
    guard.consume("acme", "emails", 1)
    key = f"{guard.calls.prefix}:{{acme}}:m:2026-06"
    assert_ttl(
        raw_client(guard), key, seconds_until(datetime(2026, 12, 1, tzinfo=timezone.utc), clock)
    )


def test_history_months_sets_how_long_monthly_keys_live(make_guard: MakeGuard, clock: Any) -> None:
    guard = make_guard(plans=PLANS, history_months=2)
    guard.consume("acme", "emails", 1)
    key = f"{guard.calls.prefix}:{{acme}}:m:2026-11"
    assert_ttl(
        raw_client(guard), key, seconds_until(datetime(2027, 1, 1, tzinfo=timezone.utc), clock)
    )
    assert len(guard.usage("acme").periods) == 2


def test_cumulative_history_lives_only_as_long_as_the_window(
    make_guard: MakeGuard, clock: Any
) -> None:
    guard = make_guard(plans=PLANS, history_months=3)
    client = raw_client(guard)
    base = f"{guard.calls.prefix}:{{acme}}:"
    ttls: dict[str, float] = {}
    for month in range(1, 8):
        clock.set(2026, month, 15)
        guard.set_usage("acme", "storage", month)
        # Each month's value lives until the month leaves the 3-month window.
        leaves = datetime(2026, month + 3, 1, tzinfo=timezone.utc)
        ttls[f"m:2026-{month:02}"] = seconds_until(leaves, clock)
    for name, ttl in ttls.items():
        assert_ttl(client, base + name, ttl)
    assert client.hgetall(base + "m:2026-07") == {"storage": "7"}
    # Only the window's months are read.
    assert guard.usage("acme").meters["storage"].history == (5, 6, 7)


def test_a_cumulative_value_never_expires(make_guard: MakeGuard, clock: Any) -> None:
    guard = make_guard(plans=PLANS, history_months=3)
    guard.set_usage("acme", "storage", 42)
    client = raw_client(guard)
    org = f"{guard.calls.prefix}:{{acme}}:org"
    assert client.hget(org, "storage") == "42"
    assert client.ttl(org) == -1
    # Long after November left the window, the value unchanged since shows in every month.
    clock.set(2027, 8, 15)
    storage = guard.usage("acme").meters["storage"]
    assert (storage.used, storage.history) == (42, (42, 42, 42))


def test_the_history_of_a_cumulative_meter_carries_the_value_into_the_window(
    make_guard: MakeGuard, clock: Any
) -> None:
    guard = make_guard(plans=PLANS)  # window of November: June to November
    clock.set(2026, 2, 10)
    guard.set_usage("acme", "storage", 30)
    clock.set(2026, 8, 20)
    guard.set_usage("acme", "storage", 50)
    guard.set_usage("acme", "storage", 60)
    # July has no value of its own: August keeps the value it started from.
    month = f"{guard.calls.prefix}:{{acme}}:m:2026-08"
    assert raw_client(guard).hgetall(month) == {"storage": "60", "s:storage": "30"}
    clock.set(2026, 11, 15)
    # February is out of the window: June and July show the value carried in, the months
    # without a change show the one before them.
    assert guard.usage("acme").meters["storage"].history == (30, 30, 60, 60, 60, 60)
    guard.release("acme", "storage", 20)
    assert guard.usage("acme").meters["storage"].history == (30, 30, 60, 60, 60, 40)


def test_the_first_personal_count_of_a_month_drops_the_month_befores(
    guard: UsageGuard, clock: Any
) -> None:
    # Only the current month's personal counts are ever read: November's go with
    # December's first one instead of waiting six months for their TTL.
    guard.consume("acme", "ai_tokens", 10, user="alice")
    base = f"{guard.calls.prefix}:{{acme}}:"
    client = raw_client(guard)
    assert client.hgetall(base + "u:2026-11") == {"alice:ai_tokens": "10"}
    clock.set(2026, 12, 1)
    guard.consume("acme", "ai_tokens", 3, user="bob")
    assert client.exists(base + "u:2026-11") == 0
    assert client.hgetall(base + "u:2026-12") == {"bob:ai_tokens": "3"}
    assert_ttl(
        client, base + "u:2026-12", seconds_until(datetime(2027, 6, 1, tzinfo=timezone.utc), clock)
    )
    assert guard.usage("acme", user="alice").personal["ai_tokens"].used == 0
    # The org's own November count stays for the history.
    assert client.hget(base + "m:2026-11", "ai_tokens") == "10"


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
    base = f"{guard.calls.prefix}:{{{encoded}}}:"
    assert keys_of(guard) == {base + "m:2026-11", base + "u:2026-11"}
    assert raw_client(guard).hgetall(base + "u:2026-11") == {f"{encoded}:ai_tokens": "7"}
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
    # org, budgets, m:, u:, idem:, r:, reservations, held
    assert len(names) == 8
    assert all(name.count("{") == name.count("}") == 1 and tag in name for name in names)
    assert len({key_slot(name.encode()) for name in names}) == 1


def test_the_prefix_is_configurable(make_guard: MakeGuard) -> None:
    guard = make_guard(plans=PLANS, prefix="billing7")
    guard.consume("acme", "emails")
    assert keys_of(guard) == {"billing7:{acme}:m:2026-11"}
    for bad in ("", "a:b", "{x}", "a b"):
        with pytest.raises(InvalidUsage):
            make_guard(prefix=bad)


def test_the_default_prefix_is_ug() -> None:
    guard = UsageGuard.from_url("memory://")
    guard.consume("acme", "emails")
    assert raw_client(guard).keys("*") == [f"ug:{{acme}}:m:{datetime.now(timezone.utc):%Y-%m}"]
    assert KeySpace("ug", "acme").org == "ug:{acme}:org"


@pytest.mark.real_redis
@pytest.mark.parametrize("storage_url", ["redis"], indirect=True)
def test_a_plain_redis_client_reads_the_counters(guard: UsageGuard) -> None:
    guard.set_budget("acme", "alice", "ai_tokens", 100)
    guard.consume("acme", "ai_tokens", 42, user="alice")
    guard.set_usage("acme", "storage", 10_485_760)
    base = f"{guard.calls.prefix}:{{acme}}:"
    with redis.Redis.from_url(os.environ["USAGE_GUARD_REDIS_URL"], decode_responses=True) as cli:
        # What `redis-cli HGET 'ug:{acme}:m:2026-11' ai_tokens` and friends show an operator.
        assert cli.hget(base + "m:2026-11", "ai_tokens") == "42"
        assert cli.hget(base + "u:2026-11", "alice:ai_tokens") == "42"
        assert cli.hget(base + "budgets", "alice:ai_tokens") == "100"
        assert cli.hget(base + "org", "storage") == "10485760"
        assert cli.hget(base + "m:2026-11", "storage") == "10485760"


def script_commands() -> set[str]:
    """Every command the Lua scripts call: Redis 7 counts those in commandstats too."""
    return {
        f"cmdstat_{name.lower()}"
        for source in SOURCES.values()
        for name in re.findall(r"redis\.p?call\('(\w+)'", source)
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


def snapshot(guard: UsageGuard) -> dict[str, tuple[str, Any, bool]]:
    """Every key of the guard with its type, value and whether it expires."""
    client = raw_client(guard)
    read = {
        "hash": client.hgetall,
        "string": client.get,
        "zset": lambda key: client.zrange(key, 0, -1, withscores=True),
    }
    return {
        key: (kind, read[kind](key), client.ttl(key) > 0)
        for key in keys_of(guard)
        for kind in [client.type(key)]
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
    key = f"{guard.calls.prefix}:{{acme}}:m:2026-11"
    ttl = raw_client(guard).ttl(key)
    # November's counter lives until May 2027 starts, counted from 23:59:59.999 Nov 30.
    expected = (datetime(2027, 5, 1, tzinfo=timezone.utc) - readings[0]).total_seconds()
    assert abs(ttl - expected) <= 2
