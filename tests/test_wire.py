"""The lean clients of ``redis://`` and ``rediss://``: replies reach their callers, a failed
connection is never reused, and URLs carry passwords, databases and TLS."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import RedisProcess, self_signed
from scripted import ScriptedServer
from usage_guard import BackendMisconfigured, BackendUnavailable, InvalidUsage, Plan, UsageGuard
from usage_guard.keys import KeySpace
from usage_guard.multiplexed import MultiplexedScripts
from usage_guard.periods import Period, utc_now
from usage_guard.redispy import RedisScripts
from usage_guard.wire import IDLE_SOCKETS, Endpoint, SocketScripts

PLANS = {"free": Plan("free", {"emails": 1_000_000, "ai_tokens": 1_000_000})}
TIMEOUT = 0.3


def counting(connection: int, command: int) -> bytes:
    """Replies ``connection * 1000 + command``: who answered what is visible."""
    return f":{connection * 1000 + command}\r\n".encode()


def late_first_reply(connection: int, command: int) -> float:
    return 3 * TIMEOUT if (connection, command) == (1, 1) else 0.0


def endpoint(port: int) -> Endpoint:
    return Endpoint.from_url(f"redis://127.0.0.1:{port}/0", TIMEOUT)


def test_a_sync_socket_that_timed_out_is_never_reused(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted(counting, late_first_reply)
    runner = SocketScripts(endpoint(server.port))
    with pytest.raises(redis.TimeoutError):
        runner.command("PING")
    # Had the late reply (1001) been left on a reused socket, it would answer this call.
    assert runner.command("PING") == 2001
    assert runner.command("PING") == 2002
    runner.close()


def test_an_async_connection_that_timed_out_fails_its_calls_and_is_replaced(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted(counting, late_first_reply)
    runner = MultiplexedScripts(endpoint(server.port))

    async def scenario() -> list[Any]:
        try:
            first = await asyncio.gather(
                runner.command("PING"), runner.command("PING"), return_exceptions=True
            )
            return [*first, await runner.command("PING"), await runner.command("PING")]
        finally:
            await runner.close()

    results = asyncio.run(scenario())
    assert [type(r) for r in results[:2]] == [redis.TimeoutError, redis.TimeoutError]
    assert results[2:] == [2001, 2002]


def test_an_unreadable_reply_is_a_connection_error(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted(lambda c, n: b"!garbage\r\n")
    with pytest.raises(redis.ConnectionError):
        SocketScripts(endpoint(server.port)).command("PING")
    runner = MultiplexedScripts(endpoint(server.port))

    async def ping() -> Any:
        try:
            return await runner.command("PING")
        finally:
            await runner.close()

    with pytest.raises(redis.ConnectionError):
        asyncio.run(ping())


def test_error_replies_are_raised_and_leave_the_connection_in_use(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted(lambda c, n: b"-ERR wrong\r\n" if n == 1 else counting(c, n))
    runner = SocketScripts(endpoint(server.port))
    with pytest.raises(redis.ResponseError, match="wrong"):
        runner.command("GET")
    assert runner.command("PING") == 1002  # the same connection, still in step
    runner.close()


def test_a_guard_runs_on_successive_event_loops(scripted: Callable[..., ScriptedServer]) -> None:
    server = scripted(counting)
    runner = MultiplexedScripts(endpoint(server.port))

    async def ping(close: bool) -> Any:
        try:
            return await runner.command("PING")
        finally:
            if close:
                await runner.close()

    # The loops end without closing their connection: each is closed as its loop shuts
    # down (a leaked socket would warn, and warnings fail the suite).
    for run in range(1, 201):
        assert asyncio.run(ping(close=False)) == run * 1000 + 1
    gc.collect()
    # A new loop (a new TestClient, another asyncio.run) gets its own connection.
    assert asyncio.run(ping(close=True)) == 201_001
    assert server.connections == 201


def test_the_sync_client_keeps_a_bounded_set_of_idle_sockets(
    scripted: Callable[..., ScriptedServer],
) -> None:
    everyone = threading.Barrier(64)

    def together(connection: int, command: int) -> bytes:
        everyone.wait(10)  # no reply until 64 sockets are in use at once
        return b"+PONG\r\n"

    server = scripted(together)
    runner = SocketScripts(Endpoint.from_url(f"redis://127.0.0.1:{server.port}/0", 10))
    threads = [threading.Thread(target=runner.command, args=("PING",)) for _ in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert server.connections == 64
    assert len(runner._idle) == IDLE_SOCKETS
    runner.close()


def test_event_loops_in_two_threads_each_keep_their_connection(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted(counting)
    runner = MultiplexedScripts(endpoint(server.port))
    replies: dict[str, list[int]] = {}

    def thread(name: str) -> None:
        async def calls() -> list[int]:
            try:
                got = []
                for _ in range(50):
                    got.append(await runner.command("PING"))
                    await asyncio.sleep(0)  # let the other thread's loop call in between
                return got
            finally:
                await runner.close()

        replies[name] = asyncio.run(calls())

    threads = [threading.Thread(target=thread, args=(name,)) for name in ("a", "b")]
    for worker in threads:
        worker.start()
    for worker in threads:
        worker.join(timeout=10)
    # One connection per loop, each answering its own calls in order: no reconnects.
    assert server.connections == 2
    for got in replies.values():
        connection = got[0] // 1000
        assert got == [connection * 1000 + n for n in range(1, 51)]


@pytest.mark.real_redis
def test_concurrent_async_calls_share_one_connection_and_each_gets_its_reply(
    redis_process: Any,
) -> None:
    guard = UsageGuard.from_url(redis_process.url, plans=PLANS, default_plan="free")
    orgs = [f"org{i}" for i in range(300)]

    async def scenario() -> list[int]:
        try:
            decisions = await asyncio.gather(
                *(guard.aio.consume(org, "emails", i + 1) for i, org in enumerate(orgs))
            )
            with redis.Redis(port=redis_process.port) as observer:
                assert observer.info("clients")["connected_clients"] == 2  # observer + guard
            return [d.used for d in decisions]
        finally:
            await guard.aio.aclose()

    assert asyncio.run(scenario()) == list(range(1, 301))
    guard.close()


@pytest.mark.real_redis
def test_scripts_are_loaded_again_after_a_flush(redis_process: Any) -> None:
    guard = UsageGuard.from_url(redis_process.url, plans=PLANS, default_plan="free")
    guard.consume("acme", "emails")
    with redis.Redis(port=redis_process.port) as admin:
        admin.script_flush()

    async def consume_async() -> int:
        try:
            return (await guard.aio.consume("acme", "emails")).used
        finally:
            await guard.aio.aclose()

    assert guard.consume("acme", "emails").used == 2
    admin = redis.Redis(port=redis_process.port)
    admin.script_flush()
    assert asyncio.run(consume_async()) == 3
    admin.close()
    guard.close()


@pytest.mark.real_redis
def test_a_forked_child_opens_its_own_socket(redis_process: Any) -> None:
    guard = UsageGuard.from_url(redis_process.url, plans=PLANS, default_plan="free")
    guard.consume("acme", "emails")  # leaves an idle socket in the parent
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if its answer is its own
        try:
            os._exit(0 if guard.consume("acme", "emails", 10).used == 11 else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert guard.consume("acme", "emails", 100).used == 111
    guard.close()


def both_sides(url: str, **options: Any) -> tuple[int, int]:
    """``used`` after one sync and one async consumption through ``url``."""
    guard = UsageGuard.from_url(url, plans=PLANS, default_plan="free", **options)

    async def consume_async() -> int:
        try:
            return (await guard.aio.consume("acme", "emails")).used
        finally:
            await guard.aio.aclose()

    try:
        return guard.consume("acme", "emails").used, asyncio.run(consume_async())
    finally:
        guard.close()


@pytest.mark.real_redis
def test_password_and_database_come_from_the_url(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path, "--requirepass", "s3cret")
    port = server.port
    try:
        assert both_sides(f"redis://:s3cret@127.0.0.1:{port}/3") == (1, 2)
        with redis.Redis(port=port, password="s3cret", db=3, decode_responses=True) as admin:
            month = KeySpace("ug", "acme").meters(Period.containing(utc_now()).key)
            assert admin.hget(month, "emails") == "2"
        wrong = UsageGuard.from_url(f"redis://:nope@127.0.0.1:{port}/3", plans=PLANS)
        with pytest.raises(BackendUnavailable):
            wrong.usage("acme")
        assert wrong.consume("acme", "emails").scope == "unavailable"
        wrong.close()
    finally:
        server.stop()


@pytest.mark.real_redis
def test_rediss_verifies_certificates_both_ways(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server = RedisProcess(
        tmp_path / "redis",
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(cert),
        "--tls-auth-clients",
        "yes",
        tls=True,
    )
    port = server.port
    url = f"rediss://127.0.0.1:{port}/0?ssl_certfile={cert}&ssl_keyfile={key}"
    try:
        # The server's certificate checked against a given CA, or not checked at all.
        assert both_sides(f"{url}&ssl_ca_certs={cert}") == (1, 2)
        assert both_sides(f"{url}&ssl_cert_reqs=none") == (3, 4)
        # Options only redis-py follows: refused by the lean client, followed by redis-py's.
        relaxed = f"{url}&ssl_ca_certs={cert}&ssl_check_hostname=false"
        with pytest.raises(InvalidUsage, match="ssl_check_hostname"):
            UsageGuard.from_url(relaxed)
        assert both_sides(f"{relaxed}&client=redis-py") == (5, 6)
        # Refused, so an outage rather than a connection: the self-signed certificate
        # without its CA, and a client without the certificate this server asks for.
        # ping() names the unverified certificate a misconfiguration; a server missing the
        # client's certificate just hangs up, which reads as an outage.
        refusals = {
            url: BackendMisconfigured,
            f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}": BackendUnavailable,
        }
        for refused, raised in refusals.items():
            untrusted = UsageGuard.from_url(refused, plans=PLANS)
            assert untrusted.consume("acme", "emails").scope == "unavailable"
            with pytest.raises(raised):
                untrusted.ping()
            untrusted.close()
    finally:
        server.stop()


def test_endpoint_reads_the_url() -> None:
    plain = Endpoint.from_url("redis://127.0.0.1:6380", 1.0)
    assert (plain.host, plain.port, plain.tls, plain.handshake) == ("127.0.0.1", 6380, None, ())
    full = Endpoint.from_url("rediss://alice:pw@cache.example:7000/2", 1.0)
    assert (full.host, full.port, full.tls is not None) == ("cache.example", 7000, True)
    assert full.handshake == (
        b"*3\r\n$4\r\nAUTH\r\n$5\r\nalice\r\n$2\r\npw\r\n",
        b"*2\r\n$6\r\nSELECT\r\n$1\r\n2\r\n",
    )


def test_a_redis_that_stops_reading_gets_back_pressure_not_an_unbounded_buffer() -> None:
    deaf = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(deaf.accept()[0]), daemon=True).start()
    runner = MultiplexedScripts(endpoint(deaf.getsockname()[1]))
    value = "x" * 100_000

    async def flood() -> tuple[int, list[Any], float]:
        started = asyncio.get_running_loop().time()
        calls = [asyncio.ensure_future(runner.command("SET", "k", value)) for _ in range(400)]
        await asyncio.sleep(0.1)
        connection = runner._connection
        assert connection is not None and connection.transport is not None
        buffered = connection.transport.get_write_buffer_size()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        await runner.close()
        return buffered, outcomes, asyncio.get_running_loop().time() - started

    try:
        buffered, outcomes, took = asyncio.run(flood())
    finally:
        for connection in held:
            connection.close()
        deaf.close()
    # 40 MB asked to be written; the buffer holds about one high-water mark (64 KiB) and
    # the commands that were already on their way when it filled.
    assert buffered < 1_000_000
    assert all(isinstance(o, (redis.TimeoutError, redis.ConnectionError)) for o in outcomes)
    assert took < TIMEOUT + 0.5


@pytest.mark.real_redis
def test_a_unix_socket_goes_through_redis_py(tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    server = RedisProcess(tmp_path / "redis", "--unixsocket", str(path), "--unixsocketperm", "700")
    try:
        guard = UsageGuard.from_url(f"unix://{path}?db=2")
        assert isinstance(guard.backend.sync(), RedisScripts)
        guard.close()
        assert both_sides(f"unix://{path}?db=2") == (1, 2)
        with redis.Redis(unix_socket_path=str(path), db=2) as plain:
            assert len(plain.keys("ug:{acme}:*")) == 1
    finally:
        server.stop()


@pytest.mark.parametrize("port", ["99999", "abc"])
@pytest.mark.parametrize("client", ["", "?client=redis-py"])
def test_a_url_with_a_bad_port_is_refused_by_name(port: str, client: str) -> None:
    with pytest.raises(InvalidUsage, match="cannot use the storage URL"):
        UsageGuard.from_url(f"redis://localhost:{port}/0{client}")


def test_closing_the_async_client_closes_a_connection_still_reading_late_replies(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted(counting, late_first_reply)
    runner = MultiplexedScripts(endpoint(server.port))

    async def scenario() -> bool:
        with pytest.raises(redis.TimeoutError):
            await runner.command("PING")
        given_up = runner._connection
        assert given_up is not None and given_up.draining  # reads the late reply still
        assert await runner.command("PING") == 2001  # on a new connection
        await runner.close()
        return given_up.draining

    assert asyncio.run(scenario()) is False


def test_a_sync_call_reading_the_clock_first_still_ends_when_its_budget_does(
    scripted: Callable[..., ScriptedServer],
) -> None:
    """Each reply takes 0.4 s; the call has 0.5 s: reading TIME must not restart its wait."""
    time_reply = b"*2\r\n$10\r\n1700000000\r\n$1\r\n0\r\n"
    server = scripted(lambda c, n: time_reply if n == 1 else b":1\r\n", lambda c, n: 0.4)
    runner = SocketScripts(Endpoint.from_url(f"redis://127.0.0.1:{server.port}/0", 1.0))
    args: list[str | int] = ["x", 0]
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        runner.run("consume", ["k"], args, wait=0.5, deadline_arg=1)
    assert time.monotonic() - started < 0.7
    runner.close()
