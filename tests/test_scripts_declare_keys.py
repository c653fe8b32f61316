"""Every key a script touches is one it declared in KEYS.

Redis Cluster lets a script touch an undeclared key only when its slot happens
to live on the same node, so standalone Redis, fakeredis and even our Cluster
tests (every key of an org shares one slot) would let a missing declaration
pass. Here a private redis-server's MONITOR shows every command the scripts run,
``COMMAND GETKEYS`` names the keys of each, and each must be among the keys of
the script call that ran it.
"""

from __future__ import annotations

import re
import threading
from datetime import datetime, timezone

import redis

from conftest import Clock, RedisProcess
from usage_guard import Plan, UsageGuard
from usage_guard.ratelimit import RateLimits

PLANS = {
    "free": Plan(
        "free",
        {"ai_tokens": 1000, "emails": 10, "contacts": 10},
        rate_limits={"api_calls": "5/minute;100/hour"},
    ),
    "pro": Plan("pro", {"emails": 100}),
}
END = "end-of-scenario"
SCRIPT_CALLS = ("EVALSHA", "EVAL")


def scenario(guard: UsageGuard, clock: Clock) -> None:
    """Every script and every mode of it, expired and late reservations included."""
    guard.assign_plan("acme", "pro")
    guard.set_limit("acme", "contacts", 50)
    guard.remove_limit("acme", "contacts")
    guard.set_budget("acme", "alice", "ai_tokens", 600)
    guard.consume("acme", "emails", 2)
    guard.consume("acme", {"ai_tokens": 90, "contacts": 4}, user="alice")
    guard.consume("acme", "emails", 1, idempotency_key="order-1")
    guard.consume("acme", "emails", 1, idempotency_key="order-1")
    guard.check("acme", {"ai_tokens": 5, "emails": 1}, user="alice")
    guard.consume("acme", "ai_tokens", 10_000, user="alice")  # denied: taken back
    settled = guard.reserve("acme", {"ai_tokens": 700, "contacts": 3}, user="alice", ttl=60)
    settled.settle({"ai_tokens": 500, "contacts": 1})
    guard.reserve("acme", "emails", 4, ttl=60).cancel()
    guard.reserve("acme", "ai_tokens", 100, user="bob", ttl=30)  # left to expire
    late = guard.reserve("acme", {"emails": 3, "contacts": 2}, ttl=30)
    clock.advance(seconds=31)
    guard.usage("acme", user="alice")  # sweeps both
    late.settle({"emails": 5, "contacts": 1})  # a plain consumption now
    guard.reserve("acme", "emails", 1, ttl=10).cancel()
    november = guard.reserve("acme", {"emails": 1, "contacts": 1}, ttl=86400)
    clock.set(2026, 12, 1, 0, 1)
    november.settle({"emails": 2, "contacts": 2})  # counted in November, changed in December
    guard.release("acme", "contacts", 1)
    guard.set_usage("acme", "contacts", 9)
    guard.report("acme", user="alice")
    RateLimits(guard).hit("acme", ["api_calls", "emails"])


# A MONITOR line: `<time> [<db> <client address, or "lua">] "<arg>" "<arg>" ...`.
MONITOR_LINE = re.compile(r"^\S+ \[\d+ (\S+)\] (.*)$", re.S)
QUOTED = re.compile(r'"((?:\\.|[^"\\])*)"')


def watch(client: redis.Redis, into: list[tuple[bool, list[str]]], ready: threading.Event) -> None:
    """Collect (run by a script, arguments) of every command until ``ECHO END``."""
    with client.monitor() as monitor:  # type: ignore[no-untyped-call]
        ready.set()
        while True:
            line = monitor.connection.read_response()
            if isinstance(line, bytes):
                line = line.decode()
            found = MONITOR_LINE.match(line)
            if not found:
                continue  # the OK that starts the feed
            args = [
                arg.encode("latin-1", "backslashreplace").decode("unicode_escape")
                for arg in QUOTED.findall(found[2])
            ]
            into.append((found[1] == "lua", args))
            if args == ["ECHO", END]:
                return


def keys_of(client: redis.Redis, args: list[str]) -> list[bytes | str]:
    if args[0].upper() == "TIME":  # COMMAND GETKEYS refuses a command without keys
        return []
    return client.command_getkeys(*args)


def test_every_key_a_script_touches_is_declared(redis_process: RedisProcess) -> None:
    clock = Clock(datetime(2026, 11, 30, 23, 0, tzinfo=timezone.utc))
    monitored: list[tuple[bool, list[str]]] = []
    ready = threading.Event()
    client = redis.Redis.from_url(redis_process.url, decode_responses=True)
    watcher = threading.Thread(target=watch, args=(client, monitored, ready), daemon=True)
    watcher.start()
    assert ready.wait(5)
    url = redis_process.url
    with UsageGuard.from_url(url, plans=PLANS, default_plan="free", clock=clock) as guard:
        scenario(guard, clock)
    client.echo(END)
    watcher.join(10)
    assert not watcher.is_alive()

    declared: set[str] = set()
    undeclared: list[tuple[bytes | str, str]] = []
    scripts = touched = 0
    for by_script, args in monitored:
        if not by_script:
            if args[0].upper() in SCRIPT_CALLS:
                scripts += 1
                declared = set(args[3 : 3 + int(args[2])])
            continue
        for key in keys_of(client, args):
            touched += 1
            if key not in declared:
                undeclared.append((key, " ".join(args)[:120]))
    assert scripts >= 25 and touched > 100  # the scenario ran through the scripts
    assert not undeclared
