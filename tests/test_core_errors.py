"""One error table for every client: what each error reply means, and what the guard does.

Outages (``OOM``, ``READONLY``, ``BUSY``, ``LOADING``, ...) follow ``on_backend_error``;
misconfigurations follow it too but say so; anything else is logged with its traceback
and counted apart (and fails a test: the suite re-raises it).
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from scripted import ScriptedServer
from usage_guard import BackendMisconfigured, BackendUnavailable, Plan, UsageGuard
from usage_guard import failures as failures_module
from usage_guard.faults import Fault, classify
from usage_guard.multiplexed import MultiplexedScripts
from usage_guard.wire import Endpoint, SocketScripts

PLANS = {"free": Plan("free", {"emails": 10, "ai_tokens": 1000})}

# Each error reply a Redis deployment really sends, and what it means for a guard.
REPLIES = {
    "OOM command not allowed when used memory > 'maxmemory'.": Fault.OUTAGE,
    "READONLY You can't write against a read only replica.": Fault.OUTAGE,
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.": (
        Fault.OUTAGE
    ),
    "LOADING Redis is loading the dataset in memory": Fault.OUTAGE,
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.": (
        Fault.OUTAGE
    ),
    "MISCONF Redis is configured to save RDB snapshots, but it's unable to persist to disk.": (
        Fault.OUTAGE
    ),
    "CLUSTERDOWN The cluster is down": Fault.OUTAGE,
    "TRYAGAIN Multiple keys request during rehashing of slot": Fault.OUTAGE,
    "ERR max number of clients reached": Fault.OUTAGE,
    "NOREPLICAS Not enough good replicas to write.": Fault.OUTAGE,
    "NOAUTH Authentication required.": Fault.MISCONFIGURED,
    "WRONGPASS invalid username-password pair or user is disabled.": Fault.MISCONFIGURED,
    "NOPERM this user has no permissions to run the 'evalsha' command": Fault.MISCONFIGURED,
    "ERR The user executing the script can't run this command or subcommand script: f_1": (
        Fault.MISCONFIGURED
    ),
    "WRONGTYPE Operation against a key holding the wrong kind of value": Fault.UNEXPECTED,
    "ERR Error running script (call to f_0123): @user_script:1: bad": Fault.UNEXPECTED,
}


def replying(message: str) -> Callable[[int, int], bytes]:
    return lambda connection, command: f"-{message}\r\n".encode()


def redis_py_error(port: int) -> Exception:
    """What redis-py's own client raises for the server's reply."""
    with warnings.catch_warnings():  # lib_name=None: no CLIENT SETINFO before the command
        warnings.simplefilter("ignore", DeprecationWarning)
        client = redis.Redis(
            port=port, lib_name=None, lib_version=None, retry=Retry(NoBackoff(), 0)
        )
    try:
        client.execute_command("GET", "k")  # type: ignore[no-untyped-call]
    except redis.RedisError as error:
        return error
    finally:
        client.close()
    raise AssertionError("no error")


@pytest.mark.parametrize("message", REPLIES)
def test_the_lean_client_raises_what_redis_py_raises(
    scripted: Callable[..., ScriptedServer], message: str
) -> None:
    server = scripted(replying(message))
    expected = redis_py_error(server.port)
    endpoint = Endpoint.from_url(f"redis://127.0.0.1:{server.port}/0", 2.0)
    sync = SocketScripts(endpoint)
    with pytest.raises(redis.RedisError) as raised:
        sync.command("GET", "k")
    sync.close()
    assert (type(raised.value), str(raised.value)) == (type(expected), str(expected))

    async def on_one_connection() -> Exception:
        runner = MultiplexedScripts(endpoint)
        try:
            await runner.command("GET", "k")
        except redis.RedisError as error:
            return error
        finally:
            await runner.close()
        raise AssertionError("no error")

    error = asyncio.run(on_one_connection())
    assert (type(error), str(error)) == (type(expected), str(expected))
    assert classify(error) is REPLIES[message]


@pytest.mark.parametrize(
    ("error", "fault"),
    [
        (ConnectionRefusedError(111, "refused"), Fault.OUTAGE),
        (TimeoutError(), Fault.OUTAGE),
        (redis.TimeoutError("slow"), Fault.OUTAGE),
        (redis.exceptions.ClusterError("TTL exhausted."), Fault.OUTAGE),
        (redis.exceptions.SlotNotCoveredError("no node"), Fault.OUTAGE),
        (redis.exceptions.MovedError("3999 127.0.0.1:6381"), Fault.OUTAGE),
        (KeyError("bug"), Fault.UNEXPECTED),
        (AttributeError("'NoneType' object has no attribute 'split'"), Fault.UNEXPECTED),
        (redis.exceptions.DataError("bad argument"), Fault.UNEXPECTED),
    ],
)
def test_the_table_for_driver_exceptions(error: Exception, fault: Fault) -> None:
    assert classify(error) is fault


def test_tls_verification_failures_are_misconfigurations() -> None:
    import ssl

    try:
        try:
            raise ssl.SSLCertVerificationError(1, "certificate verify failed")
        except ssl.SSLError as cause:
            raise redis.ConnectionError("cannot connect") from cause
    except redis.ConnectionError as wrapped:
        assert classify(wrapped) is Fault.MISCONFIGURED


def test_redis_py_losing_its_connection_mid_command_is_an_outage() -> None:
    # redis-py's async cluster client fails this way when a node's connection is closed
    # under a command in flight; the same AttributeError from anywhere else is a bug.
    namespace: dict[str, Any] = {}
    exec(  # a frame whose file is inside redis-py, as in the real traceback
        compile(
            "def write(c): c.writelines([])", "/site-packages/redis/asyncio/connection.py", "exec"
        ),
        namespace,
    )
    try:
        namespace["write"](None)
    except AttributeError as error:
        assert classify(error) is Fault.OUTAGE


OUTAGE_REPLIES = [m for m, fault in REPLIES.items() if fault is Fault.OUTAGE]


@pytest.mark.parametrize("message", OUTAGE_REPLIES)
def test_outage_replies_follow_the_policy_sync_and_async(
    scripted: Callable[..., ScriptedServer], message: str
) -> None:
    server = scripted(replying(message))
    url = f"redis://127.0.0.1:{server.port}/0"
    guard = UsageGuard.from_url(url, plans=PLANS, on_backend_error={"ai_tokens": "deny"})
    allowed = guard.consume("acme", "emails")
    denied = guard.consume("acme", "ai_tokens")
    assert (allowed.allowed, allowed.scope) == (True, "unavailable")
    assert (denied.allowed, denied.scope) == (False, "unavailable")
    with pytest.raises(BackendUnavailable):
        guard.usage("acme")

    async def on_the_async_side() -> tuple[bool, bool]:
        try:
            first = await guard.aio.consume("acme", "emails")
            second = await guard.aio.consume("acme", "ai_tokens")
            return first.allowed, second.allowed
        finally:
            await guard.aio.aclose()

    assert asyncio.run(on_the_async_side()) == (True, False)
    assert guard.failures.backend_errors == 5
    guard.close()


def test_a_wrong_password_follows_the_policy_and_says_it_is_a_misconfiguration(
    redis_process: Any, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from conftest import RedisProcess

    secured = RedisProcess(tmp_path / "secured", "--requirepass", "s3cret")
    url = f"redis://:wrong-s3cret@127.0.0.1:{secured.port}/0"
    guard = UsageGuard.from_url(url, plans=PLANS, on_backend_error={"ai_tokens": "deny"})
    try:
        with caplog.at_level(logging.ERROR, logger="usage_guard"):
            assert guard.consume("acme", "emails").scope == "unavailable"
            assert not guard.consume("acme", "ai_tokens").allowed
        with pytest.raises(BackendMisconfigured) as raised:
            guard.usage("acme")
        assert "wrong-s3cret" not in str(raised.value)
        [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert "configuration" in record.getMessage() and "wrong-s3cret" not in record.getMessage()
    finally:
        guard.close()
        secured.stop()


def test_anything_else_follows_the_policy_but_is_logged_with_its_traceback(
    scripted: Callable[..., ScriptedServer],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = scripted(replying("ERR Error running script (call to f_1): @user_script:9: bad"))
    guard = UsageGuard.from_url(f"redis://127.0.0.1:{server.port}/0", plans=PLANS)
    # The suite re-raises such errors; production answers by the policy.
    with pytest.raises(redis.ResponseError, match="Error running script"):
        guard.consume("acme", "emails")
    monkeypatch.setattr(failures_module.Failures, "reraise_unexpected", False)
    with caplog.at_level(logging.ERROR, logger="usage_guard"):
        decision = guard.consume("acme", "emails")
    assert (decision.allowed, decision.scope) == (True, "unavailable")
    [record] = caplog.records
    assert record.exc_info is not None and record.exc_info[0] is redis.ResponseError
    assert (guard.failures.unexpected_errors, guard.failures.backend_errors) == (2, 0)
    guard.close()


def test_logs_are_paced_by_time_not_by_success(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr("usage_guard.failures.time.monotonic", lambda: now[0])
    failures = failures_module.Failures()
    outage = redis.ConnectionError("refused")
    with caplog.at_level(logging.WARNING, logger="usage_guard"):
        in_flight = failures.backend_errors
        failures.record(outage)
        # A call that was already in flight when Redis failed proves no recovery.
        failures.recovered(in_flight)
        assert [r.levelname for r in caplog.records] == ["ERROR"]
        # A Cluster failover: failures of one node's orgs interleaved with successes.
        for _ in range(499):
            failures.record(outage)
            failures.recovered(failures.backend_errors)
            now[0] += 0.01
        assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING"]
        now[0] += 60
        failures.record(outage)
        failures.recovered(failures.backend_errors)
    assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING", "ERROR", "WARNING"]
    assert "499 more failed calls since the last report" in caplog.records[2].getMessage()
    assert failures.backend_errors == 501
    # A short outage soon after: counted, not logged (one ERROR a minute at most) ...
    now[0] += 30
    for _ in range(50):
        failures.record(outage)
        now[0] += 0.2
    failures.recovered(failures.backend_errors)
    assert len(caplog.records) == 4 and failures.backend_errors == 551
    # ... and a later one is reported with its own figures.
    now[0] += 3600
    with caplog.at_level(logging.WARNING, logger="usage_guard"):
        failures.record(outage)
        now[0] += 2
        failures.record(outage)
        failures.recovered(failures.backend_errors)
    assert "50 more failed calls" in caplog.records[4].getMessage()
    assert "(2 failed calls over 2.0 s)" in caplog.records[5].getMessage()
