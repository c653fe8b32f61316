"""The example apps behind real servers with several workers: the hard cap holds exactly."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import REDIS_URL, delete_prefix, free_port, wait_for
from usage_guard import UsageGuard

ROOT = Path(__file__).resolve().parent.parent
SERVERS = {
    "fastapi-uvicorn": ["uvicorn", "--workers", "2", "--host", "127.0.0.1", "--port", "{port}",
                        "examples.fastapi_app.app:app"],
    "flask-gunicorn": ["gunicorn", "-w", "3", "--threads", "4", "-b", "127.0.0.1:{port}",
                       "examples.flask_app.app:app"],
    "django-gunicorn": ["gunicorn", "-w", "3", "--threads", "4", "-b", "127.0.0.1:{port}",
                        "examples.django_app.wsgi:application"],
    "django-uvicorn": ["uvicorn", "--workers", "2", "--host", "127.0.0.1", "--port", "{port}",
                       "examples.django_app.asgi:application"],
}  # fmt: skip


@pytest.mark.real_redis
@pytest.mark.parametrize("server", SERVERS)
def test_workers_hold_the_hard_cap_exactly_on_real_redis(server: str) -> None:
    prefix = f"ugx{uuid.uuid4().hex[:10]}"
    guard = UsageGuard.from_url(REDIS_URL, prefix=prefix)
    guard.set_limit("race", "emails", 25)
    port = free_port()
    command = [sys.executable, "-m", *(arg.format(port=port) for arg in SERVERS[server])]
    env = {**os.environ, "USAGE_GUARD_URL": REDIS_URL, "USAGE_GUARD_PREFIX": prefix}
    process = subprocess.Popen([*command, "--log-level", "warning"], cwd=ROOT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: healthy(f"{base}/health"), 30, server)
        codes = asyncio.run(hammer(f"{base}/v1/emails", 80))
        assert sorted(codes) == [200] * 25 + [429] * 55
        assert guard.usage("race").meters["emails"].used == 25
    finally:
        process.terminate()
        process.wait(timeout=15)
        guard.close()
        delete_prefix(REDIS_URL, prefix)


def healthy(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.HTTPError:
        return False


async def hammer(url: str, requests: int) -> list[int]:
    """``requests`` concurrent email sends by one user of the org ``race``."""
    headers = {"x-org-id": "race", "x-user-id": "u1"}
    email = {"to": "x@example.com", "subject": "race"}
    async with httpx.AsyncClient(timeout=30) as http:
        responses = await asyncio.gather(
            *(http.post(url, json=email, headers=headers) for _ in range(requests))
        )
    return [response.status_code for response in responses]
