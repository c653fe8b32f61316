"""``guard.ping()``: misconfiguration is loud, outages are not fatal, risky servers warn."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from pathlib import Path
from typing import Any, cast

import pytest
from flask import Flask
from starlette.applications import Starlette

from conftest import RedisProcess
from usage_guard import (
    BackendMisconfigured,
    BackendUnavailable,
    InvalidUsage,
    Plan,
    UsageGuard,
    UsageGuardMiddleware,
)
from usage_guard.asgi import from_headers
from usage_guard.flask import UsageGuardFlask
from usage_guard.health import redacted
from usage_guard.scripts import SHAS

PLANS = {"free": Plan("free", {"emails": 10})}
SAFE = ("--maxmemory-policy", "noeviction", "--appendonly", "yes")


def ping_both(url: str) -> Any:
    """``ping()`` and ``await aio.ping()``: the same health, or the same error (raised)."""
    guard = UsageGuard.from_url(url, plans=PLANS, timeout=0.5)

    async def on_the_async_side() -> Any:
        try:
            return await guard.aio.ping()
        finally:
            await guard.aio.aclose()

    outcomes: list[Any] = []
    for side in (guard.ping, lambda: asyncio.run(on_the_async_side())):
        try:
            outcomes.append(side())
        except BackendUnavailable as error:
            outcomes.append(error)
    guard.close()
    sync, asynchronous = outcomes
    if isinstance(sync, Exception):
        assert type(asynchronous) is type(sync)
        raise sync
    assert asynchronous == sync
    return sync


def test_memory_is_healthy() -> None:
    health = UsageGuard.from_url("memory://").ping()
    assert health.ok and health.warnings == ()


def test_a_safe_server_is_healthy_and_the_scripts_are_loaded(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path, *SAFE)
    try:
        health = ping_both(server.url)
        assert health.ok and health.version is not None and health.version >= "6"
        import redis

        with redis.Redis(port=server.port) as plain:
            assert all(plain.script_exists(*SHAS.values()))
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("settings", "warning"),
    [
        (("--maxmemory-policy", "allkeys-lru", "--appendonly", "yes"), "may evict counters"),
        (("--maxmemory-policy", "noeviction"), "persistence is off"),  # --save "" in RedisProcess
    ],
)
def test_servers_that_can_lose_counters_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, settings: tuple[str, ...], warning: str
) -> None:
    server = RedisProcess(tmp_path, *settings)
    try:
        with caplog.at_level(logging.WARNING, logger="usage_guard"):
            health = ping_both(server.url)
        [found] = health.warnings
        assert warning in found and not health.ok
        assert any(warning in r.getMessage() for r in caplog.records)
    finally:
        server.stop()


def test_a_wrong_password_is_a_misconfiguration_never_showing_the_password(
    tmp_path: Path,
) -> None:
    server = RedisProcess(tmp_path, *SAFE, "--requirepass", "right-pass")
    try:
        assert ping_both(f"redis://:right-pass@127.0.0.1:{server.port}/0").ok
        for url in (
            f"redis://:wrong-pass@127.0.0.1:{server.port}/0",
            f"redis://127.0.0.1:{server.port}/0",  # no password at all
        ):
            with pytest.raises(BackendMisconfigured) as raised:
                ping_both(url)
            assert "wrong-pass" not in str(raised.value)
    finally:
        server.stop()


def test_acl_permissions_the_scripts_need(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path, *SAFE)
    try:
        import redis

        with redis.Redis(port=server.port) as admin:
            admin.acl_setuser("noscripts", enabled=True, passwords=["+pw"], keys=["*"],
                              commands=["+@all", "-script", "-eval", "-evalsha"])  # fmt: skip
            admin.acl_setuser("noconfig", enabled=True, passwords=["+pw"], keys=["*"],
                              commands=["+@all", "-config", "-info"])  # fmt: skip
        with pytest.raises(BackendMisconfigured, match="NoPermissionError"):
            ping_both(f"redis://noscripts:pw@127.0.0.1:{server.port}/0")
        # CONFIG and INFO refused: the scripts load, there is just nothing to warn about.
        health = ping_both(f"redis://noconfig:pw@127.0.0.1:{server.port}/0")
        assert health.ok and health.version is None
    finally:
        server.stop()


def test_an_unreachable_server_is_unavailable(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path)
    server.stop()
    with pytest.raises(BackendUnavailable) as raised:
        ping_both(server.url)
    assert not isinstance(raised.value, BackendMisconfigured)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://u:secret@h:1/0?x=1", "redis://h:1"),
        ("redis://:secret@h", "redis://h"),
        ("redis://h:1?password=secret", "redis://h:1"),
        ("redis://:p@ss/w:rd#1%@127.0.0.1:6379", "redis://127.0.0.1:6379"),
        ("rediss://[::1]:6380/2", "rediss://[::1]:6380"),
        ("redis+cluster://:secret@h1:7000,h2:7001", "redis+cluster://h1:7000,h2:7001"),
        ("redis://se cret@h", "redis://h"),
    ],
)
def test_redacted_never_shows_credentials(url: str, shown: str) -> None:
    assert redacted(url) == shown


def test_a_password_in_the_query_never_shows(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path, *SAFE, "--requirepass", "right-pass")
    try:
        with pytest.raises(BackendMisconfigured) as raised:
            ping_both(f"redis://127.0.0.1:{server.port}/0?password=wrong-pass")
        assert "wrong-pass" not in str(raised.value)
    finally:
        server.stop()


def test_a_user_who_may_eval_but_not_load_scripts_passes(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path, *SAFE)
    try:
        import redis

        with redis.Redis(port=server.port) as admin:
            admin.acl_setuser("evalonly", enabled=True, passwords=["+pw"], keys=["*"],
                              commands=["+@all", "-script"])  # fmt: skip
        url = f"redis://evalonly:pw@127.0.0.1:{server.port}/0"
        assert ping_both(url).ok
        guard = UsageGuard.from_url(url, plans=PLANS, default_plan="free")
        assert guard.consume("acme", "emails").scope == "organization"
        guard.close()
    finally:
        server.stop()


def test_a_replica_warns_that_writes_will_fail(tmp_path: Path) -> None:
    primary = RedisProcess(tmp_path / "primary", *SAFE)
    replica = RedisProcess(
        tmp_path / "replica", *SAFE, "--replicaof", "127.0.0.1", str(primary.port)
    )
    try:
        [warning] = ping_both(replica.url).warnings
        assert "read-only replica" in warning
    finally:
        replica.stop()
        primary.stop()


def test_a_hung_redis_costs_one_timeout_not_one_per_probe(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path, *SAFE)
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            ping_both(server.url)  # both sides: two timeouts of 0.5 s
        assert time.monotonic() - started < 2 * 0.5 + 1
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        server.stop()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("rediss://127.0.0.1:1/0?ssl_ca_certs=/nonexistent/ca.pem", "No such file"),
        ("redis://127.0.0.1:port/0", "Port could not be cast"),
        ("redis://127.0.0.1:1/0?ssl_check_hostname=false", "add client=redis-py"),
        ("redis://127.0.0.1:1/0?client=hiredis", "'lean' (the default) or 'redis-py'"),
        ("redis+sentinel://:s3cret@127.0.0.1", "unsupported storage URL"),
    ],
)
def test_a_url_the_client_cannot_follow_fails_at_once(url: str, says: str) -> None:
    with pytest.raises(InvalidUsage, match=re.escape(says)) as raised:
        UsageGuard.from_url(url)
    assert "s3cret" not in str(raised.value)


# -- at start-up -----------------------------------------------------------------------


def lifespan(app: Any) -> list[dict[str, Any]]:
    """Drive an ASGI app's start-up as a server does; what it sent back."""
    sent: list[dict[str, Any]] = []

    async def run() -> None:
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        await inbox.put({"type": "lifespan.startup"})

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"].startswith("lifespan.startup"):
                await inbox.put({"type": "lifespan.shutdown"})

        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, send)

    asyncio.run(run())
    return sent


def guarded(url: str) -> Starlette:
    app = Starlette()
    guard = UsageGuard.from_url(url, plans=PLANS, timeout=0.5)
    app.add_middleware(
        UsageGuardMiddleware, guard=guard, identify=from_headers(), ping_on_startup=True
    )
    return app


def test_startup_fails_on_a_misconfiguration_and_warns_on_an_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisProcess(tmp_path, *SAFE, "--requirepass", "right-pass")
    try:
        [failed] = lifespan(guarded(f"redis://:wrong@127.0.0.1:{server.port}/0"))
        assert failed["type"] == "lifespan.startup.failed"
        assert "AuthenticationError" in failed["message"]
        # A bug found while starting fails start-up too, never skips it.
        buggy = guarded(f"redis://:right-pass@127.0.0.1:{server.port}/0")
        middleware = buggy.build_middleware_stack()
        while not isinstance(middleware, UsageGuardMiddleware):
            middleware = cast(Any, middleware).app  # every layer wraps the next in .app
        middleware.aguard.ping = lambda: 1 / 0  # type: ignore[method-assign,assignment,return-value]
        [broken] = lifespan(middleware)
        assert broken["type"] == "lifespan.startup.failed"
        started = lifespan(guarded(f"redis://:right-pass@127.0.0.1:{server.port}/0"))
        assert [m["type"] for m in started] == [
            "lifespan.startup.complete",
            "lifespan.shutdown.complete",
        ]
        with pytest.raises(BackendMisconfigured):
            UsageGuardFlask(
                Flask(__name__),
                guard=UsageGuard.from_url(f"redis://:wrong@127.0.0.1:{server.port}/0"),
                identify=from_headers(),
                ping_on_startup=True,
            )
    finally:
        server.stop()
    with caplog.at_level(logging.WARNING, logger="usage_guard"):
        down = lifespan(guarded(server.url))
        UsageGuardFlask(
            Flask(__name__),
            guard=UsageGuard.from_url(server.url, timeout=0.5),
            identify=from_headers(),
            ping_on_startup=True,
        )
    assert down[0]["type"] == "lifespan.startup.complete"
    assert sum("starting anyway" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.cluster
def test_a_cluster_answers_a_ping_on_both_sides(cluster_url: str) -> None:
    health = ping_both(cluster_url)
    assert health.version is not None and health.url == cluster_url


def test_a_cluster_nobody_answers_is_unavailable() -> None:
    with pytest.raises(BackendUnavailable) as raised:
        ping_both("redis+cluster://:s3cret@127.0.0.1:1,127.0.0.1:2")
    assert not isinstance(raised.value, BackendMisconfigured)
    assert "s3cret" not in str(raised.value)
