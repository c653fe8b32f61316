"""Backends for the test suite.

Every test that takes ``make_guard`` runs once per backend: ``memory`` always;
``redis`` when ``USAGE_GUARD_REDIS_URL`` names a server (keys go under a
per-test prefix and are deleted after; nothing is flushed); ``cluster`` when
``USAGE_GUARD_CLUSTER=1``, on a throwaway 3-master cluster this file starts
with the ``redis-server`` binary and stops after the session.

Tests marked ``real_redis`` (or using ``redis_process``) or ``cluster`` are
deselected when their server is not configured, ``browser`` ones when Debian's
Chromium is not installed. With ``CI=true`` all three must be there: a missing
one fails the run instead of shrinking it.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx2
import pytest
import redis
from starlette.testclient import TestClient

import frameworks
from scripted import ScriptedServer
from usage_guard import UsageGuard
from usage_guard.failures import Failures

#: pytester drives a user's own test suite (the test kit's plugin).
pytest_plugins = ("pytester",)

REDIS_URL = os.environ.get("USAGE_GUARD_REDIS_URL", "")
CLUSTER = os.environ.get("USAGE_GUARD_CLUSTER", "") == "1"
IN_CI = os.environ.get("CI", "").lower() == "true"
CHROMIUM = os.path.exists("/usr/bin/chromium")
# The console script of the environment running the tests, not another one on PATH.
_BESIDE_PYTHON = Path(sys.executable).parent / "usage-guard"
USAGE_GUARD = (
    str(_BESIDE_PYTHON)
    if _BESIDE_PYTHON.exists()
    else shutil.which("usage-guard") or "usage-guard"  # not installed: fails naming it
)


def pytest_configure(config: pytest.Config) -> None:
    # A bug must fail its test, not hide as an outage answered by the policy.
    Failures.reraise_unexpected = True
    if IN_CI and not (REDIS_URL and CLUSTER):
        raise pytest.UsageError(
            "CI=true needs USAGE_GUARD_REDIS_URL and USAGE_GUARD_CLUSTER=1: "
            "real Redis and Redis Cluster tests must run in CI"
        )
    if IN_CI and not CHROMIUM:
        raise pytest.UsageError("CI=true needs /usr/bin/chromium (apt-get install chromium)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    for item in items:
        # A test that starts its own redis-server needs one installed, like a real_redis test.
        needs_redis = item.get_closest_marker("real_redis") is not None or "redis_process" in (
            getattr(item, "fixturenames", ())
        )
        needs_cluster = item.get_closest_marker("cluster") is not None
        needs_browser = item.get_closest_marker("browser") is not None
        if (
            (needs_redis and not REDIS_URL)
            or (needs_cluster and not CLUSTER)
            or (needs_browser and not CHROMIUM)
            or _page_adapter_on_a_third_backend(item)
        ):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _page_adapter_on_a_third_backend(item: pytest.Item) -> bool:
    """The Usage page's tests run on every backend under Starlette, and on memory:// and
    one real Redis under the other frameworks: their adapters never touch the backend."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("framework", "starlette") != "starlette" and params.get("storage_url") in (
        "redis-py",
        "cluster",
    )


def free_port() -> int:
    """A free loopback port up to 55535: a cluster node also listens on port + 10000."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port <= 55535:
            return port


def wait_for(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


class RedisProcess:
    """A throwaway redis-server on loopback, stopped by the test process.

    ``port`` defaults to a free one (give the port of a stopped server to replace it);
    with ``tls`` the port speaks TLS only (pass the ``--tls-*`` files in ``extra``).
    Ready once the port accepts connections, so it also suits servers wanting a password.
    """

    def __init__(
        self, directory: Path, *extra: str, port: int | None = None, tls: bool = False
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.port = port or free_port()
        listen = (
            ["--port", "0", "--tls-port", str(self.port)] if tls else ["--port", str(self.port)]
        )
        directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                binary,
                *listen,
                *("--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
                *("--dir", str(directory)),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def accepting() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True

        try:
            wait_for(accepting, what=f"redis-server on {self.port}")
        except TimeoutError:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, valid for a day (openssl)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def paused(redis_process: RedisProcess) -> Iterator[Callable[..., None]]:
    """``paused()`` stops the test's server (SIGSTOP), as a hung Redis; ``paused(False)``
    resumes it, as does the end of the test."""
    stopped = [False]

    def pause(stop: bool = True) -> None:
        os.kill(redis_process.process.pid, signal.SIGSTOP if stop else signal.SIGCONT)
        stopped[0] = stop

    yield pause
    if stopped[0]:
        os.kill(redis_process.process.pid, signal.SIGCONT)


@pytest.fixture(scope="session")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A 3-master Redis Cluster on loopback (about 2 s to start)."""
    from cluster import Cluster  # it imports this module: not before this module is loaded

    cluster = Cluster(tmp_path_factory.mktemp("cluster"), node_timeout_ms=2000)
    yield cluster.url(cluster.nodes[0])
    cluster.stop()


# "redis-py": the same server through redis-py's client instead of the lean one.
BACKENDS = (
    ["memory"] + (["redis", "redis-py"] if REDIS_URL else []) + (["cluster"] if CLUSTER else [])
)


@pytest.fixture(params=BACKENDS)
def storage_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "redis":
        return REDIS_URL
    if request.param == "redis-py":
        return REDIS_URL + ("&" if "?" in REDIS_URL else "?") + "client=redis-py"
    return str(request.getfixturevalue("cluster_url"))


class Clock:
    """An injectable clock: ``clock.set(...)``, ``clock.advance(...)``."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def set(
        self,
        year: int,
        month: int,
        day: int,
        hour: int = 0,
        minute: int = 0,
        second: int = 0,
        microsecond: int = 0,
    ) -> None:
        self.now = datetime(year, month, day, hour, minute, second, microsecond, timezone.utc)

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2026, 11, 15, 12, 0, tzinfo=timezone.utc))


def delete_prefix(url: str, prefix: str) -> None:
    """Delete the keys of one test prefix (never FLUSH a shared server)."""
    if url.startswith("redis+cluster://"):
        client: Any = redis.RedisCluster.from_url(url.replace("redis+cluster", "redis"))
        for key in client.scan_iter(match=f"{prefix}:*", target_nodes=redis.RedisCluster.ALL_NODES):
            client.delete(key)
        for node in client.get_nodes():  # RedisCluster.close() leaves these open
            node.redis_connection.connection_pool.disconnect()
    else:
        client = redis.Redis.from_url(url)
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
    client.close()


_plain_clients: dict[str, redis.Redis] = {}


def raw_client(guard: UsageGuard) -> Any:
    """A plain client on the guard's storage, as an operator would open one.

    The guard's own redis-py client where it has one (fakeredis for ``memory://``,
    the cluster client); one shared ``redis.Redis`` per URL otherwise.
    """
    client = getattr(guard.backend.sync(), "client", None)
    if client is not None:
        return client
    url = guard.backend.url
    if url not in _plain_clients:
        _plain_clients[url] = redis.Redis.from_url(url, decode_responses=True)
    return _plain_clients[url]


@pytest.fixture
def make_guard(storage_url: str, clock: Clock) -> Iterator[Callable[..., UsageGuard]]:
    """``make_guard(plans=..., default_plan=..., **options)`` on the current backend.

    Each guard gets a fresh key prefix and the test's ``clock`` unless given one.
    """
    made: list[tuple[UsageGuard, str]] = []

    def factory(**options: Any) -> UsageGuard:
        prefix = options.pop("prefix", f"ugt{uuid.uuid4().hex[:10]}")
        options.setdefault("clock", clock)
        guard = UsageGuard.from_url(storage_url, prefix=prefix, **options)
        made.append((guard, prefix))
        return guard

    yield factory
    for guard, prefix in made:
        guard.close()
        if not storage_url.startswith("memory"):
            delete_prefix(guard.backend.client_url, prefix)
    if not storage_url.startswith("memory"):
        gc.collect()  # an unclosed connection then warns in the test that leaked it


@pytest.fixture
def serve() -> Iterator[Callable[..., TestClient]]:
    """``serve(app, guard, ...)``: a started TestClient, stopped after the test.

    The guards' async clients are closed first, on the client's event loop,
    which owns their connections.
    """
    started: list[tuple[TestClient, tuple[UsageGuard, ...]]] = []

    def start(app: Any, *guards: UsageGuard) -> TestClient:
        client = TestClient(app)
        client.__enter__()
        started.append((client, guards))
        return client

    yield start
    for client, guards in started:
        assert client.portal is not None
        for guard in guards:
            client.portal.call(guard.aio.aclose)
        client.__exit__(None, None, None)


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(*args: Any) -> ScriptedServer:
        servers.append(ScriptedServer(*args))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture(params=frameworks.FRAMEWORKS)
def framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def serve_stack(serve: Callable[..., TestClient]) -> Iterator[Callable[..., httpx2.Client]]:
    """``serve_stack(framework, guard, app)`` for Starlette and Flask apps, or
    ``serve_stack(framework, guard, **settings)`` for Django's handler under those
    settings: an httpx client of it, closed (and the settings restored) after the test."""
    with ExitStack() as stack:

        def start(framework: str, guard: UsageGuard, app: Any = None, **settings: Any) -> Any:
            if framework in frameworks.DJANGO_STACKS:
                stack.enter_context(frameworks.django_settings(**settings))
                app = frameworks.django_handler(framework)
            if framework in ("starlette", "django-asgi"):
                return serve(app, guard)
            return stack.enter_context(frameworks.wsgi_client(app))

        yield start


@pytest.fixture
def serve_page(
    framework: str, serve_stack: Callable[..., httpx2.Client]
) -> Callable[..., httpx2.Client]:
    """``serve_page(guard, identify=..., is_admin=..., trusted_origins=...)``: the Usage page
    at ``/settings/usage/`` under the test's ``framework``, and an httpx client for it."""

    def start(guard: UsageGuard, **page: Any) -> httpx2.Client:
        if framework in frameworks.DJANGO_STACKS:
            return serve_stack(framework, guard, **frameworks.django_page_settings(guard, **page))
        return serve_stack(framework, guard, frameworks.page_app(framework, guard, **page))

    return start
