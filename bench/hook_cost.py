#!/usr/bin/env python3
"""What the instrumentation hook costs per ``guard.consume``, in one process.

Four guards on the same server, measured in interleaved rounds (best and median round):
no observer, a no-op :class:`~usage_guard.Observer`, and the OpenTelemetry adapter on
the SDK's ``MeterProvider`` (an in-memory reader: recording costs what it costs with
any exporter, which runs off the request path), with and without its duration
histogram. Then the hook's own work alone, without
the round trip: what the guard hands an observer for one admitted ``consume``.

Usage: python bench/hook_cost.py [--url redis://127.0.0.1:6379/15] [--n 5000] [--rounds 7]
(``pip install -e '.[test]'`` brings the SDK). Keys go under fresh prefixes and are
deleted afterwards; nothing is flushed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from collections.abc import Callable

import redis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from usage_guard import OpenTelemetryObserver, Plan, UsageGuard
from usage_guard.decision import Decision
from usage_guard.observe import Observer, Observers

PLANS = {"bench": Plan("bench", {"api_calls": 10**15})}


def per_call_us(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def otel_observer(durations: bool = True) -> tuple[OpenTelemetryObserver, MeterProvider]:
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    return OpenTelemetryObserver(provider, durations=durations), provider


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", default=os.environ.get("USAGE_GUARD_REDIS_URL", "redis://127.0.0.1:6379/15")
    )
    parser.add_argument("--n", type=int, default=5000, help="calls per round and variant")
    parser.add_argument("--rounds", type=int, default=7)
    options = parser.parse_args()

    adapter, provider = otel_observer()
    counters_only, provider_without = otel_observer(durations=False)
    variants: dict[str, tuple[UsageGuard, str]] = {}
    for name, observer in (
        ("no hook", None),
        ("no-op hook", Observer()),
        ("OTel", adapter),
        ("OTel, durations=False", counters_only),
    ):
        prefix = f"ugbench{uuid.uuid4().hex[:8]}"
        guard = UsageGuard.from_url(options.url, plans=PLANS, default_plan="bench", prefix=prefix)
        if observer is not None:
            guard.observe(observer)
        variants[name] = (guard, prefix)

    rounds: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    try:
        for guard, _ in variants.values():  # warm: connected, prepared, scripts loaded
            per_call_us(lambda g=guard: g.consume("acme", "api_calls"), 500)
        for number in range(options.rounds):
            # Each round starts with another variant: none always follows the same one.
            for name in order[number % len(order) :] + order[: number % len(order)]:
                guard = variants[name][0]
                took = per_call_us(lambda g=guard: g.consume("acme", "api_calls"), options.n)
                rounds[name].append(took)
    finally:
        for guard, prefix in variants.values():
            guard.close(timeout=0)
            client = redis.Redis.from_url(options.url)
            for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                client.delete(key)
            client.close()

    print(f"{options.url}, {options.rounds} rounds of {options.n} calls:")
    print("| guard | best round µs/consume | hook's cost | median round | hook's cost |")
    print("| --- | --- | --- | --- | --- |")
    best = {name: min(took) for name, took in rounds.items()}
    median = {name: statistics.median(took) for name, took in rounds.items()}
    for name in variants:
        if name == "no hook":
            print(f"| {name} | {best[name]:.1f} | - | {median[name]:.1f} | - |")
            continue
        print(
            f"| {name} | {best[name]:.1f} | {best[name] - best['no hook']:+.1f} "
            f"| {median[name]:.1f} | {median[name] - median['no hook']:+.1f} |"
        )

    # The hook's own work for one admitted consume (its latency and its decision), alone.
    decision = Decision(True, "api_calls", "organization", 1, 10, 9, None)
    print("\nThe hook alone, per admitted consume (no round trip), best of 7:")
    for name, observer in (
        ("no-op hook", Observer()),
        ("OTel", otel_observer()[0]),
        ("OTel, durations=False", otel_observer(durations=False)[0]),
    ):
        observers = Observers()
        observers.add(observer, {})

        def hand_over(o: Observers = observers) -> None:
            o.answered("consume", time.perf_counter(), decision, ())

        took = min(per_call_us(hand_over, 100_000) for _ in range(7))
        print(f"| {name} | {took:.2f} µs |")
    provider.shutdown()
    provider_without.shutdown()


if __name__ == "__main__":
    main()
