"""Guarded Starlette route vs the shared harness's one-EVALSHA reference and slowapi.

Runs, in one go and on a throwaway redis-server (so ``CONFIG RESETSTAT`` touches
no shared server), the in-process ASGI driver of ``../shared/bench`` on each app,
then the same apps under uvicorn + wrk when ``wrk`` is installed, and prints
requests/s, the ratios and Redis commands per request (``INFO commandstats``)::

    pip install slowapi          # the peer (not a usage_guard dependency)
    python bench/http_bench.py [--n 20000] [--repeat 5] [--harness ../shared/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {
    "usage_guard (Starlette)": "bench.http_bench_app:app",
    "usage_guard, no RateLimit fields (Starlette)": "bench.http_bench_app:app_without_fields",
    "reference one-EVALSHA (Starlette)": "apps.ref_evalsha_mw:app",
    "slowapi ASGI middleware (Starlette)": "apps.slowapi_starlette_asgi:app",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(200):
        done = subprocess.run(
            ["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True
        )
        if done.stdout.strip() == "PONG":
            return server
        time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


def run(command: list[str], env: dict[str, str]) -> dict[str, object]:
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--harness", type=Path, default=ROOT.parent / "shared" / "bench")
    parser.add_argument("--wrk-duration", type=int, default=10)
    args = parser.parse_args()
    port = free_port()
    redis_server = start_redis(port)
    env = {
        **os.environ,
        "REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "REDIS_PORT": str(port),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(args.harness)]),
    }
    header = ["--header", "x-org-id: org-1"]
    rows: dict[str, dict[str, object]] = {}
    try:
        for name, target in TARGETS.items():
            driver = [sys.executable, str(args.harness / "asgi_driver.py"), target, "--json"]
            driver += ["--n", str(args.n), "--repeat", str(args.repeat), "--redis-stats", *header]
            rows[name] = {"in_process": run(driver, env)}
            if shutil.which("wrk"):
                wrk = [sys.executable, str(args.harness / "wrk_run.py"), target, "--json"]
                wrk += ["--duration", str(args.wrk_duration), "--redis-stats", *header]
                rows[name]["wrk"] = run(wrk, env)
    finally:
        redis_server.terminate()
        redis_server.wait()
    report(rows)


def report(rows: dict[str, dict[str, object]]) -> None:
    def rate(row: dict[str, object], mode: str) -> float | None:
        result = row.get(mode)
        if not isinstance(result, dict):
            return None
        value = result.get("req_s_median", result.get("req_s"))
        return float(value) if value is not None else None

    ours, without_fields, reference, slowapi = (rows[name] for name in TARGETS)
    print("| app | in-process req/s | cmds/req | uvicorn+wrk req/s |")
    print("| --- | --- | --- | --- |")
    for name, row in rows.items():
        in_process = row["in_process"]
        assert isinstance(in_process, dict)
        wrk = rate(row, "wrk")
        print(
            f"| {name} | {rate(row, 'in_process'):,.0f} | "
            f"{in_process.get('redis_cmds_per_req_all')} "
            f"({in_process.get('redis_breakdown_per_req')}) | "
            f"{'n/a (wrk not installed)' if wrk is None else f'{wrk:,.0f}'} |"
        )
    for label, guarded in (("usage_guard", ours), ("no RateLimit fields", without_fields)):
        for mode in ("in_process", "wrk"):
            mine, ref, peer = rate(guarded, mode), rate(reference, mode), rate(slowapi, mode)
            if mine and ref and peer:
                print(
                    f"{label}, {mode}: {mine / ref:.2f}x the reference, {mine / peer:.2f}x slowapi"
                )


if __name__ == "__main__":
    main()
