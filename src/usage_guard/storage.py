"""Where the counters live, chosen by URL, and the one I/O operation guards need.

``memory://`` runs the same Lua in-process through fakeredis + lupa (each URL
gets its own server; ``memory://NAME`` shares one by name within the process);
``redis://`` and ``rediss://`` use the lean clients of :mod:`usage_guard.wire`;
``redis+cluster://host:7000,host:7001,…`` uses redis-py's cluster clients,
discovering the cluster from whichever seed answers. Every client sends EVALSHA
and loads the script again after NOSCRIPT.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Protocol, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterError,
    NoScriptError,
    TryAgainError,
)
from redis.retry import Retry

from .errors import InvalidUsage
from .health import redacted
from .scripts import SOURCES
from .wire import Endpoint, MultiplexedScripts, SocketScripts

#: Seconds before trying again a script whose slot is being migrated: the first wait,
#: doubled each time up to the second.
RESHARD_DELAYS = (0.01, 0.05)


def _slot_moving(error: Exception) -> bool:
    """Whether ``error`` means the script did not run because its slot is being migrated.

    redis-py follows MOVED, ASK and TRYAGAIN itself, 16 times at most, then raises a
    bare ``ClusterError("TTL exhausted.")``; its subclass ``ClusterDownError`` is an
    outage, not a migration. A timeout or connection error never qualifies: the script
    may have run, and running it again would count twice.
    """
    return isinstance(error, (TryAgainError, AskError)) or type(error) is ClusterError


def _routed(client: Any, args: tuple[str | int, ...]) -> dict[str, Any]:
    """Where a cluster client sends a ping's commands without a key, which the async one
    cannot route by itself: ``SCRIPT LOAD`` to every primary, ``INFO`` and ``CONFIG`` to one."""
    if not isinstance(client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster)):
        return {}
    if args[0] == "SCRIPT":
        return {"target_nodes": client.get_primaries()}
    if args[0] in ("INFO", "CONFIG"):
        return {"target_nodes": client.get_primaries()[:1]}
    return {}


class ScriptRunner(Protocol):
    """All the I/O a guard needs: run one of the package's scripts once, return its reply.

    ``command`` sends any other command (``ping()``'s probes).
    """

    def run(self, script: str, keys: list[str], args: list[str | int]) -> Any: ...

    def command(self, *args: str | int) -> Any: ...

    def close(self) -> None: ...


class AsyncScriptRunner(Protocol):
    """The asyncio form of :class:`ScriptRunner`."""

    async def run(self, script: str, keys: list[str], args: list[str | int]) -> Any: ...

    async def command(self, *args: str | int) -> Any: ...

    async def close(self) -> None: ...


class RedisScripts:
    """Runs the package's scripts on a redis-py client (cluster, ``client=redis-py``) or
    fakeredis: one EVALSHA each.

    EVALSHA is sent directly (``Script.__call__`` costs about 10 µs more per call);
    on NOSCRIPT (a flushed or new server) the registered ``Script`` loads and runs it.
    While the slot of a call's keys is being migrated, the call is tried again until
    ``timeout`` seconds have passed since it began.
    """

    def __init__(self, client: Any, *, timeout: float) -> None:
        self.client = client
        self._scripts = {name: client.register_script(src) for name, src in SOURCES.items()}
        self._timeout = timeout

    def run(self, script: str, keys: list[str], args: list[str | int]) -> Any:
        deadline = time.monotonic() + self._timeout
        delay = RESHARD_DELAYS[0]
        while True:
            try:
                return self._evalsha(script, keys, args)
            except Exception as error:
                if not _slot_moving(error) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, RESHARD_DELAYS[1])

    def _evalsha(self, script: str, keys: list[str], args: list[str | int]) -> Any:
        registered = self._scripts[script]
        try:
            return self.client.evalsha(registered.sha, len(keys), *keys, *args)
        except NoScriptError:
            return registered(keys=keys, args=args)

    def command(self, *args: str | int) -> Any:
        return self.client.execute_command(*args, **_routed(self.client, args))

    def close(self) -> None:
        if isinstance(self.client, redis.cluster.RedisCluster):
            # RedisCluster.close() leaves its per-node pools' connections open.
            for node in cast(Any, self.client).get_nodes():
                if node.redis_connection is not None:
                    node.redis_connection.connection_pool.disconnect()
        self.client.close()


class AsyncRedisScripts:
    """Runs the scripts on an asyncio client, at most ``max_in_flight`` calls at once,
    each answered within ``wait`` seconds.

    redis-py's asyncio pools (and its cluster client, per node) fail at once past
    ``max_connections`` instead of waiting; its blocking pool waits but costs
    about 30 µs per call. A semaphore of the same size makes a burst wait for a
    turn (past ``wait`` it counts as an outage) and costs nothing while turns are free.

    The socket timeout bounds each reply, not a call: after a failure redis-py's
    cluster client rediscovers the cluster on the next call, and may ask a hung node
    first. So each call runs as a task that is given up, not cancelled, at its
    deadline (a cancelled set-up closes every connection of the client, under the
    other calls in flight). Like the sync side, it is tried again while its slot is
    being migrated.
    """

    def __init__(self, client: Any, *, max_in_flight: int, wait: float) -> None:
        self.client = client
        self._scripts = {name: client.register_script(src) for name, src in SOURCES.items()}
        self._turns = asyncio.Semaphore(max_in_flight)
        self._wait = wait
        # redis-py's async cluster client connects on first use, and a burst of first
        # calls races that set-up and drops connections: they all wait for one set-up.
        self._connected = not isinstance(client, redis.asyncio.cluster.RedisCluster)
        self._connecting: asyncio.Future[Any] | None = None
        self._pending: set[asyncio.Future[Any]] = set()

    async def _connect(self) -> None:
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self.client.initialize())
        connecting = self._connecting
        try:
            await asyncio.wait_for(asyncio.shield(connecting), self._wait)
        except asyncio.TimeoutError:
            raise redis.ConnectionError("Redis Cluster did not answer within the timeout") from None
        except BaseException:
            self._connecting = None  # the next call tries again
            raise
        self._connected = True

    async def run(self, script: str, keys: list[str], args: list[str | int]) -> Any:
        deadline = time.monotonic() + self._wait
        if not self._connected:
            await self._connect()
        if self._turns.locked():
            try:
                await asyncio.wait_for(self._turns.acquire(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                raise redis.ConnectionError("no connection free within the timeout") from None
        else:
            await self._turns.acquire()
        call = asyncio.ensure_future(self._tries(script, keys, args, deadline))
        self._pending.add(call)
        call.add_done_callback(self._finished)
        done, _ = await asyncio.wait((call,), timeout=deadline - time.monotonic())
        if not done:
            raise redis.TimeoutError("Redis Cluster did not answer within the timeout")
        return call.result()

    def _finished(self, call: asyncio.Future[Any]) -> None:
        self._turns.release()
        self._pending.discard(call)
        if not call.cancelled():
            call.exception()  # read: a call given up on must not log "never retrieved"

    async def _tries(
        self, script: str, keys: list[str], args: list[str | int], deadline: float
    ) -> Any:
        delay = RESHARD_DELAYS[0]
        while True:
            try:
                return await self._evalsha(script, keys, args)
            except Exception as error:
                if not _slot_moving(error) or time.monotonic() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESHARD_DELAYS[1])

    async def _evalsha(self, script: str, keys: list[str], args: list[str | int]) -> Any:
        registered = self._scripts[script]
        try:
            return await self.client.evalsha(registered.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await registered(keys=keys, args=args)

    async def command(self, *args: str | int) -> Any:
        if not self._connected:
            await self._connect()
        return await self.client.execute_command(*args, **_routed(self.client, args))

    async def close(self) -> None:
        for call in self._pending:
            call.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        # A client made with a connection pool (fakeredis's) leaves that pool open on aclose().
        pool = getattr(self.client, "connection_pool", None)
        await self.client.aclose()
        if pool is not None:
            await pool.disconnect()


_named_servers: dict[str, Any] = {}
_named_lock = threading.Lock()


SCHEMES = ("memory", "redis", "rediss", "unix", "redis+cluster", "rediss+cluster")


class Backend:
    """The clients for one URL, made on first use: a guard and its async twin share it.

    ``redis://`` and ``rediss://`` go through the lean client unless the URL says
    ``client=redis-py`` (for what the lean client does not follow: TLS options such
    as ``ssl_check_hostname``, unix sockets); the URL is checked here, once.
    """

    def __init__(self, url: str, *, timeout: float = 1.0, max_connections: int = 100) -> None:
        if not isinstance(url, str):
            raise InvalidUsage("the storage URL must be a str")
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise InvalidUsage(
                f"unsupported storage URL {redacted(url)}: use memory://, redis://, rediss://, "
                "unix:// or redis+cluster://"
            )
        if not timeout > 0:
            raise InvalidUsage("timeout must be a positive number of seconds")
        self.url = url
        self.timeout = timeout
        self.max_connections = max_connections
        self._parts = parts
        query = parse_qsl(parts.query, keep_blank_values=True)
        client = dict(query).get("client", "lean")
        if client not in ("lean", "redis-py"):
            raise InvalidUsage("client= in the storage URL is 'lean' (the default) or 'redis-py'")
        #: The URL as redis-py reads it: without this library's own ``client`` option.
        self.client_url = url
        if any(k == "client" for k, _ in query):
            others = urlencode([(k, v) for k, v in query if k != "client"])
            self.client_url = urlunsplit(parts._replace(query=others))
        self._endpoint: Endpoint | None = None
        if parts.scheme in ("redis", "rediss") and client == "lean":
            self._endpoint = _endpoint(self.client_url, timeout)
        self._seeds = cluster_seeds(self.client_url) if parts.scheme.endswith("+cluster") else None
        self._server: Any = None
        if parts.scheme == "memory":
            self._server = _memory_server(parts.netloc + parts.path)
        self._sync: ScriptRunner | None = None
        self._async: AsyncScriptRunner | None = None

    @property
    def kind(self) -> str:
        return self._parts.scheme

    def _redis_options(self) -> dict[str, Any]:
        # No automatic retries: a timed-out script may have run, and a retry would count twice.
        return {
            "decode_responses": True,
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
        }

    def sync(self) -> ScriptRunner:
        if self._sync is None:
            if self._endpoint is not None:
                self._sync = SocketScripts(self._endpoint)
            else:
                self._sync = RedisScripts(self._sync_client(), timeout=self.timeout)
        return self._sync

    def aio(self) -> AsyncScriptRunner:
        if self._async is None:
            if self._endpoint is not None:
                self._async = MultiplexedScripts(self._endpoint)
            else:
                self._async = AsyncRedisScripts(
                    self._async_client(), max_in_flight=self.max_connections, wait=self.timeout
                )
        return self._async

    def _sync_client(self) -> Any:
        if self._server is not None:
            import fakeredis

            return fakeredis.FakeRedis(server=self._server, decode_responses=True)
        if self._seeds is None:
            return redis.Redis.from_url(
                self.client_url, retry=Retry(NoBackoff(), 0), **self._redis_options()
            )
        first, seeds = self._seeds
        return redis.cluster.RedisCluster.from_url(
            first,
            startup_nodes=[cast(Any, redis.cluster).ClusterNode(h, p) for h, p in seeds[1:]],
            retry=Retry(NoBackoff(), 0),
            # A MOVED names the slot's new owner: by default every 5th one also rediscovers
            # the whole cluster and reconnects to every node, for nothing.
            reinitialize_steps=0,
            **self._redis_options(),
        )

    def _async_client(self) -> Any:
        if self._server is not None:
            import fakeredis

            return fakeredis.FakeAsyncRedis(
                server=self._server, decode_responses=True, max_connections=self.max_connections
            )
        if self._seeds is None:
            return redis.asyncio.Redis.from_url(
                self.client_url,
                retry=AsyncRetry(NoBackoff(), 0),
                max_connections=self.max_connections,
                **self._redis_options(),
            )
        first, seeds = self._seeds
        return redis.asyncio.cluster.RedisCluster.from_url(
            first,
            startup_nodes=[
                redis.asyncio.cluster.ClusterNode(host, port) for host, port in seeds[1:]
            ],
            retry=AsyncRetry(NoBackoff(), 0),
            # A MOVED patches the slot table; by default every 5th one closes every
            # connection under the calls in flight, whose failures bring more MOVEDs: a
            # slot migration or failover then failed ~half the calls of every org for 40 s+.
            reinitialize_steps=0,
            **self._redis_options(),
        )

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.close()
            self._async = None


def _endpoint(url: str, timeout: float) -> Endpoint:
    """The lean client's endpoint, or why the URL cannot have one (a bad port, a TLS file
    that cannot be read, an option only redis-py follows)."""
    try:
        return Endpoint.from_url(url, timeout)
    except LookupError as unread:
        raise InvalidUsage(
            f"the lean client does not follow {unread} in {redacted(url)}: "
            "add client=redis-py to the URL to use redis-py's client"
        ) from None
    except (ValueError, OSError) as error:
        raise InvalidUsage(f"cannot use the storage URL {redacted(url)}: {error}") from None


def cluster_seeds(url: str) -> tuple[str, list[tuple[str, int]]]:
    """Split ``redis+cluster://[user:password@]h1:7000,h2:7001,…[/0][?options]``.

    Returns the URL of the first seed alone (``redis://`` or ``rediss://``, with the
    credentials, path and options, for redis-py's ``from_url``) and every seed's
    ``(host, port)``: the cluster is discovered from whichever seed answers first.
    """
    parts = urlsplit(url)
    credentials, at, hosts = parts.netloc.rpartition("@")
    seeds = []
    for seed in hosts.split(","):
        try:
            address = urlsplit(f"//{seed}")
            host, port = address.hostname, address.port or 6379
        except ValueError:
            host = None
        if not host:
            raise InvalidUsage(f"invalid Redis Cluster seed {seed!r} in the storage URL")
        seeds.append((host, port))
    first = f"{credentials}{at}{hosts.split(',', 1)[0]}"
    scheme = parts.scheme.removesuffix("+cluster")
    return urlunsplit((scheme, first, parts.path, parts.query, parts.fragment)), seeds


def _memory_server(name: str) -> Any:
    import fakeredis

    if not name:
        return fakeredis.FakeServer()
    with _named_lock:
        if name not in _named_servers:
            _named_servers[name] = fakeredis.FakeServer()
        return _named_servers[name]
