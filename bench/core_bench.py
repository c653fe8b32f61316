#!/usr/bin/env python3
"""The hot path of the core: µs per ``consume`` next to the raw floor, commands, memory.

In one run, interleaved so machine noise hits both sides alike:

* floor: redis-py ``register_script`` of a minimal 3-key script (three INCRBY on
  keys sharing a hash tag), sync and asyncio, on the same server;
* ``UsageGuard.consume`` and ``AsyncUsageGuard.consume`` of one metric with a
  user (a plan limit and a personal counter), and without one (sync);
* the asyncio pair again with 32 tasks calling at once: the floor's redis-py
  pool against the guard's one multiplexed connection;
* the same on ``memory://`` next to fakeredis running the floor script;
* Redis commands per consumption from ``INFO commandstats`` deltas;

Memory per organization is ``../shared/bench/memory_per_org.py``'s: ``INFO
used_memory`` counts each key's overhead, which ``MEMORY USAGE`` leaves out.

Usage: python bench/core_bench.py [--url redis://127.0.0.1:6379/14] [--n 5000] [--rounds 5]
Keys go under a fresh prefix and are deleted afterwards; nothing is flushed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import fakeredis
import redis
import redis.asyncio

from usage_guard import Plan, UsageGuard
from usage_guard.catalog import DEFAULT_CATALOG

FLOOR_LUA = """
local a = redis.call('INCRBY', KEYS[1], ARGV[1])
local b = redis.call('INCRBY', KEYS[2], ARGV[1])
local c = redis.call('INCRBY', KEYS[3], ARGV[1])
return {a, b, c}
"""
BIG = 10**15
PLANS = {"bench": Plan("bench", {m.name: BIG for m in DEFAULT_CATALOG})}


def per_call_us(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


async def per_call_us_async(fn: Callable[[], Awaitable[object]], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await fn()
    return (time.perf_counter() - start) / n * 1e6


def floor_keys(prefix: str) -> list[str]:
    return [f"{prefix}:{{floor}}:{name}" for name in ("a", "b", "c")]


def bench_pair(
    label: str, floor: Callable[[], object], guarded: Callable[[], object], n: int, rounds: int
) -> None:
    for fn in (floor, guarded):
        per_call_us(fn, n // 10)
    floors, guards = [], []
    for _ in range(rounds):
        floors.append(per_call_us(floor, n))
        guards.append(per_call_us(guarded, n))
    report(label, floors, guards)


async def per_call_us_concurrent(fn: Callable[[], Awaitable[object]], n: int, tasks: int) -> float:
    """µs per call of ``n`` calls made by ``tasks`` tasks at once (throughput, not latency)."""

    async def worker() -> None:
        for _ in range(n // tasks):
            await fn()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return (time.perf_counter() - start) / (n // tasks * tasks) * 1e6


async def bench_pair_async(
    label: str,
    floor: Callable[[], Awaitable[object]],
    guarded: Callable[[], Awaitable[object]],
    n: int,
    rounds: int,
    tasks: int = 1,
) -> None:
    async def measure(fn: Callable[[], Awaitable[object]], count: int) -> float:
        if tasks == 1:
            return await per_call_us_async(fn, count)
        return await per_call_us_concurrent(fn, count, tasks)

    for fn in (floor, guarded):
        await measure(fn, n // 10)
    floors, guards = [], []
    for _ in range(rounds):
        floors.append(await measure(floor, n))
        guards.append(await measure(guarded, n))
    report(label, floors, guards)


def report(label: str, floors: list[float], guards: list[float]) -> None:
    floor, guarded = statistics.median(floors), statistics.median(guards)
    print(
        f"| {label} | {floor:.1f} | {guarded:.1f} | {guarded / floor:.2f}x | {len(floors)} rounds |"
    )


def commands_per_consume(url: str, guard: UsageGuard, n: int) -> dict[str, float]:
    """Per-command ``INFO commandstats`` deltas per consume (INFO itself left out).

    Redis counts the commands a script runs as well as the EVALSHA that the
    client sent, so the client's round trips are the ``evalsha`` row.
    """
    admin = redis.Redis.from_url(url)

    def calls() -> dict[str, int]:
        stats = admin.info("commandstats")
        return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}

    before = calls()
    for _ in range(n):
        guard.consume("cmd-org", "ai_tokens", 1, user="alice")
    after = calls()
    admin.close()
    deltas = {name: (after[name] - before.get(name, 0)) / n for name in after if name != "info"}
    return {name: delta for name, delta in sorted(deltas.items()) if delta}


def delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    url, n, rounds = options.url, options.n, options.rounds
    prefix = f"ugbench{uuid.uuid4().hex[:8]}"
    args = ["1"]
    print(f"# redis-py {redis.__version__}, n={n} per round, median of {rounds} rounds")
    print("| path | floor µs/call | consume µs/call | ratio | |")
    print("| --- | --- | --- | --- | --- |")
    try:
        guard = UsageGuard.from_url(url, plans=PLANS, default_plan="bench", prefix=prefix)
        client = redis.Redis.from_url(url)
        floor = client.register_script(FLOOR_LUA)
        keys = floor_keys(prefix)
        bench_pair(
            "real Redis, sync, with a user (personal counter)",
            lambda: floor(keys=keys, args=args),
            lambda: guard.consume("bench-org", "ai_tokens", 1, user="alice"),
            n,
            rounds,
        )
        bench_pair(
            "real Redis, sync, organization only",
            lambda: floor(keys=keys, args=args),
            lambda: guard.consume("bench-org", "emails", 1),
            n,
            rounds,
        )

        async def run_async() -> None:
            aclient = redis.asyncio.Redis.from_url(url)
            afloor = aclient.register_script(FLOOR_LUA)
            aguard = guard.aio
            await bench_pair_async(
                "real Redis, asyncio",
                lambda: afloor(keys=keys, args=args),
                lambda: aguard.consume("bench-org", "ai_tokens", 1, user="alice"),
                n,
                rounds,
            )
            await bench_pair_async(
                "real Redis, asyncio, 32 tasks at once (µs per call of the batch)",
                lambda: afloor(keys=keys, args=args),
                lambda: aguard.consume("bench-org", "ai_tokens", 1, user="alice"),
                n,
                rounds,
                tasks=32,
            )
            await aclient.aclose()
            await aguard.aclose()

        asyncio.run(run_async())

        server = fakeredis.FakeServer()
        fake = fakeredis.FakeRedis(server=server)
        fake_floor = fake.register_script(FLOOR_LUA)
        memory = UsageGuard.from_url("memory://", plans=PLANS, default_plan="bench")
        bench_pair(
            "memory:// (fakeredis + lupa), sync",
            lambda: fake_floor(keys=keys, args=args),
            lambda: memory.consume("bench-org", "ai_tokens", 1, user="alice"),
            max(1, n // 5),
            rounds,
        )
        print()
        per_command = commands_per_consume(url, guard, 1000)
        print(f"Client commands per consume: evalsha {per_command.pop('evalsha', 0):.3f}")
        inside = ", ".join(f"{name} {count:.3f}" for name, count in per_command.items())
        print(f"Run by the script inside that EVALSHA: {inside}")
        guard.close()
        client.close()
    finally:
        delete_prefix(url, prefix)


if __name__ == "__main__":
    main()
