"""When a guard sends a consumption twice because of plans (issue 13).

A call carries the limits of the one plan the guard believes the org is on, and learns
the org's plan from the script when it was assigned elsewhere. On a throwaway
redis-server: an admin guard assigns plan ``pro`` to ORGS orgs; a worker guard (another
process, as far as the guards know) consumes round-robin over them, ROUNDS times; then
the admin moves CHANGED of them to ``team`` and the worker goes round once more. Prints
the worker's round trips per round and its ``stats().plan_refreshes``::

    .venv/bin/python bench/plan_changes.py [--orgs 10000] [--changed 100]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import time

import redis

from usage_guard import DEFAULT_CATALOG, Plan, UsageGuard


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--orgs", type=int, default=10_000)
    parser.add_argument("--changed", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                redis.Redis(port=port).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)
        limits = {m.name: 10**12 for m in DEFAULT_CATALOG}
        plans = {name: Plan(name, limits) for name in ("free", "pro", "team")}
        url = f"redis://127.0.0.1:{port}/0"
        admin = UsageGuard.from_url(url, plans=plans, default_plan="free")
        worker = UsageGuard.from_url(url, plans=plans, default_plan="free")
        orgs = [f"org-{i:06d}" for i in range(options.orgs)]
        for org in orgs:
            admin.assign_plan(org, "pro")

        def round_trip_counts() -> tuple[int, int]:
            before = worker.stats().plan_refreshes
            for org in orgs:
                worker.consume(org, "api_calls", 1)
            refreshes = worker.stats().plan_refreshes - before
            return len(orgs) + refreshes, refreshes

        for n in range(options.rounds):
            calls, refreshes = round_trip_counts()
            print(
                f"round {n + 1}: {len(orgs)} consumes, {calls} round trips "
                f"({refreshes} plan refreshes)"
            )
        for org in orgs[: options.changed]:
            admin.assign_plan(org, "team")
        calls, refreshes = round_trip_counts()
        print(
            f"after {options.changed} plan changes elsewhere: {len(orgs)} consumes, "
            f"{calls} round trips ({refreshes} plan refreshes)"
        )
        print(f"stats().plan_refreshes: {worker.stats().plan_refreshes}")
        admin.close()
        worker.close()
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
