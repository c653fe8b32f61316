"""Phantom charges under a hung Redis (issue 12): calls answered 'unavailable' that
Redis charges anyway once it resumes, because their EVALSHA had already been sent.

Starts its own redis-server on a free port, then for each client flavour (the ASGI
middleware on the async multiplexed client, and threads calling ``guard.consume`` on the
lean sync client) and each ``on_backend_error`` mode (deny, allow) drives an open loop of
RATE requests/s for DURATION s, each consuming 1 ``api_calls`` of its own org (limit far
away), with the server SIGSTOPped for PAUSE s in the middle. After SIGCONT, once Redis
has answered for SETTLE s, the org's counter (read with redis-py) is what was charged::

    .venv/bin/python bench/phantom.py [--json] [--rate 200] [--duration 10] [--pause 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Any

import httpx
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import usage_guard
from usage_guard import Plan, UsageGuard, UsageGuardMiddleware
from usage_guard.asgi import from_headers
from usage_guard.faults import BudgetSpent, CircuitOpen
from usage_guard.runtime import BackendErrorPolicy

TIMEOUT = 0.5
#: A call answered by the policy after at least this long was sent and timed out.
IN_FLIGHT = 0.8 * TIMEOUT
SETTLE = 2.0
SERVER_OPTIONS = ("--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no")
PLANS = {"big": Plan("big", {"api_calls": 1_000_000_000})}
MODES: tuple[BackendErrorPolicy, ...] = ("deny", "allow")
#: (outcome, latency): outcome "redis" (decided by Redis), "policy" (scope
#: 'unavailable', answered by on_backend_error) or "error: ..." (should not happen).
Record = tuple[str, float]


@dataclass
class Result:
    flavour: str
    mode: str
    requests: int
    by_redis: int
    by_policy: int
    slow: int  # by latency: >= IN_FLIGHT
    fast: int
    sent: int  # by the error the policy was given: a timeout or a dropped connection
    not_sent: int  # CircuitOpen (the breaker) or BudgetSpent
    charged: int
    charged_not_admitted: int  # deny: phantom charges; allow: served and counted
    served_uncounted: int | None  # allow only
    errors: int  # requests that raised (or an HTTP status other than 200/503)
    unexpected_errors: int  # guard.failures: a bug or a script error, not an outage
    worst_latency: float


def stop_redis(server: subprocess.Popen[bytes]) -> None:
    """By its pid: resumed (it may be paused), terminated, killed if it lingers."""
    if server.poll() is None:
        os.kill(server.pid, signal.SIGCONT)
        os.kill(server.pid, signal.SIGTERM)
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(server.pid, signal.SIGKILL)
            server.wait()


def wait_answering(port: int, limit: float) -> None:
    deadline = time.monotonic() + limit
    with redis.Redis(port=port, socket_timeout=0.2, socket_connect_timeout=0.2) as client:
        while True:
            try:
                client.ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


def pause_in_middle(pid: int, duration: float, pause: float) -> threading.Thread:
    def run() -> None:
        time.sleep((duration - pause) / 2)
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(pause)
        finally:
            os.kill(pid, signal.SIGCONT)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def run_threads(guard: UsageGuard, org: str, rate: float, duration: float) -> list[Record]:
    guard.ping()

    def one() -> Record:
        start = time.monotonic()
        try:
            decision = guard.consume(org, "api_calls")
            kind = "policy" if decision.scope == "unavailable" else "redis"
        except Exception as error:
            kind = f"error: {type(error).__name__}"
        return kind, time.monotonic() - start

    # Open loop: a request starts on schedule whether or not the earlier ones finished.
    with ThreadPoolExecutor(max_workers=1000) as pool:
        started, futures = time.monotonic(), []
        for i in range(int(rate * duration)):
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
            futures.append(pool.submit(one))
        return [future.result() for future in futures]


async def run_asgi(guard: UsageGuard, org: str, rate: float, duration: float) -> list[Record]:
    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/ping", ok)])
    app.add_middleware(UsageGuardMiddleware, guard=guard.aio, identify=from_headers())
    await guard.aio.ping()

    async def one(client: httpx.AsyncClient) -> Record:
        start = time.monotonic()
        try:
            response = await client.get("/ping", headers={"x-org-id": org})
            # 503: refused by the policy (deny). 200 without RateLimit fields: served by
            # the policy (allow), which has no quota to show; with them: admitted.
            status, fields = response.status_code, "ratelimit" in response.headers
            kind = {503: "policy", 200: "redis" if fields else "policy"}.get(status)
            kind = kind or f"error: HTTP {status}"
        except Exception as error:
            kind = f"error: {type(error).__name__}"
        return kind, time.monotonic() - start

    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            started, tasks = time.monotonic(), []
            for i in range(int(rate * duration)):  # open loop: one task per request
                await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
                tasks.append(asyncio.create_task(one(client)))
            return list(await asyncio.gather(*tasks))
    finally:
        await guard.aio.aclose()


def charged(port: int, org: str) -> int:
    """The org's api_calls counters (one per month), read with a plain redis-py client."""
    with redis.Redis(port=port, decode_responses=True) as client:
        keys = list(client.scan_iter(match=f"ug:{{{org}}}:c:api_calls:*"))
        return sum(int(client.get(key) or 0) for key in keys)


def scenario(port: int, pid: int, flavour: str, mode: BackendErrorPolicy, args: Any) -> Result:
    org = f"phantom-{flavour}-{mode}"
    url = f"redis://127.0.0.1:{port}/0"
    guard = UsageGuard.from_url(
        url, plans=PLANS, default_plan="big", timeout=TIMEOUT, on_backend_error=mode
    )
    # Why the policy answered, from the error it was given: sent to Redis and failed
    # (timed out, or failed with the call ahead of it on the multiplexed connection), or
    # never sent (the breaker, or the request's time spent).
    runtime: Any = guard.runtime
    failed, lock, why = runtime.failed, threading.Lock(), Counter[str]()

    def count_failure(call: Any, error: Exception, *rest: Any, **options: Any) -> Any:
        with lock:
            why["not_sent" if isinstance(error, (CircuitOpen, BudgetSpent)) else "sent"] += 1
        return failed(call, error, *rest, **options)

    runtime.failed = count_failure
    fault = pause_in_middle(pid, args.duration, args.pause)
    try:
        if flavour == "asgi":
            records = asyncio.run(run_asgi(guard, org, args.rate, args.duration))
        else:
            records = run_threads(guard, org, args.rate, args.duration)
    finally:
        fault.join()
        guard.close()
    wait_answering(port, 30.0)
    time.sleep(SETTLE)  # Redis answers again: what it had read before the pause has run
    by_redis = sum(kind == "redis" for kind, _ in records)
    policy = [latency for kind, latency in records if kind == "policy"]
    slow = sum(latency >= IN_FLIGHT for latency in policy)
    total = charged(port, org)
    extra = total - by_redis
    return Result(
        *(flavour, mode, len(records), by_redis, len(policy), slow, len(policy) - slow),
        *(why["sent"], why["not_sent"], total, extra),
        len(policy) - extra if mode == "allow" else None,
        sum(kind.startswith("error") for kind, _ in records),
        guard.failures.unexpected_errors,
        round(max((latency for _, latency in records), default=0.0), 3),
    )


def print_table(results: list[Result], args: Any) -> None:
    names = [field.name for field in fields(Result)]
    rows = [[name.replace("_", " ") for name in names]]
    for values in map(asdict, results):
        rows.append(["-" if values[name] is None else str(values[name]) for name in names])
    widths = [max(len(row[i]) for row in rows) for i in range(len(names))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
    print(
        f"\n{args.rate:g} requests/s open loop for {args.duration:g} s, redis-server SIGSTOPped "
        f"{args.pause:g} s in the middle, timeout={TIMEOUT}; counter (1 unit a request) read "
        f"with redis-py {SETTLE:g} s after Redis answered again.\n"
        "by policy: decision scope 'unavailable' (deny: refused, 503 over ASGI; allow: served)."
        f"\n  by latency: slow >= {IN_FLIGHT:g} s (0.8 x timeout: timed out in flight), fast "
        "sooner;\n  by the error the policy was given: sent (a timeout, or dropped with an "
        "earlier call's timeout on the multiplexed connection), not sent (breaker open).\n"
        "charged not admitted = charged - by redis: deny = phantom charges (target 0); allow ="
        " served and counted after all.\nserved uncounted = by policy - charged not admitted "
        f"(allow only; target <= sent).\nusage_guard from {os.path.dirname(usage_guard.__file__)}"
    )
    if any(r.unexpected_errors or r.errors for r in results):
        print("WARNING: unexpected errors or failed requests: this run measures a bug")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    parser.add_argument("--pause", type=float, default=5.0, help="seconds the server hangs")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the server
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    command = ["redis-server", "--port", str(port), *SERVER_OPTIONS]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        wait_answering(port, 10.0)
        flavours = ("asgi", "threads")
        results = [scenario(port, server.pid, f, m, args) for f in flavours for m in MODES]
    finally:
        stop_redis(server)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print_table(results, args)


if __name__ == "__main__":
    main()
