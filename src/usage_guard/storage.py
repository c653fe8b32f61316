"""Where the counters live, chosen by URL, and the one I/O operation guards need.

``memory://`` runs the same Lua in-process through fakeredis + lupa (each URL
gets its own server; ``memory://NAME`` shares one by name within the process);
``redis://`` and ``rediss://`` use the lean clients of :mod:`usage_guard.wire` and
:mod:`usage_guard.multiplexed`; ``redis+cluster://host:7000,host:7001,…`` (and
``client=redis-py``) use redis-py's clients (:mod:`usage_guard.redispy`), discovering
a cluster from whichever seed answers. Every client sends EVALSHA and loads the
script again after NOSCRIPT.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.retry import Retry

from .errors import InvalidUsage
from .health import redacted
from .multiplexed import MultiplexedScripts
from .redispy import AsyncCluster, AsyncRedisScripts, PerLoopRedisScripts, RedisScripts, budgeted
from .runtime import Breaker
from .wire import Endpoint, SocketScripts


class ScriptRunner(Protocol):
    """All the I/O a guard needs: run one of the package's scripts once, return its reply.

    ``command`` sends any other command (``ping()``'s probes).
    """

    def run(
        self,
        script: str,
        keys: list[str],
        args: list[str | int],
        wait: float | None = None,
        deadline_arg: int | None = None,
    ) -> Any:
        """``wait``: the longest to wait for the reply, when shorter than the timeout.
        ``args[deadline_arg]`` (when given) is set to the moment, by the server's clock,
        after which the caller has given up (see :mod:`usage_guard.servertime`)."""

    def command(self, *args: str | int) -> Any: ...

    def close(self) -> None: ...


class AsyncScriptRunner(Protocol):
    """The asyncio form of :class:`ScriptRunner`."""

    async def run(
        self,
        script: str,
        keys: list[str],
        args: list[str | int],
        wait: float | None = None,
        deadline_arg: int | None = None,
    ) -> Any: ...

    async def command(self, *args: str | int) -> Any: ...

    async def close(self) -> None: ...


#: redis-py's connection class for a URL scheme (redis:// takes the default).
_CONNECTION_CLASSES: dict[str, type[Connection | UnixDomainSocketConnection]] = {
    "rediss": SSLConnection,
    "unix": UnixDomainSocketConnection,
}

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
        if parts.scheme in ("redis", "rediss"):
            try:
                parts.port  # noqa: B018 (urllib checks the port when it is read)
            except ValueError as error:
                raise InvalidUsage(f"cannot use the storage URL {redacted(url)}: {error}") from None
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
        #: Whether the URL names a Redis Cluster (several nodes) rather than one server.
        self.cluster = parts.scheme.endswith("+cluster")
        self._seeds = cluster_seeds(self.client_url) if self.cluster else None
        self._server: Any = None
        if parts.scheme == "memory":
            self._server = _memory_server(parts.netloc + parts.path)
        self._sync: ScriptRunner | None = None
        self._async: AsyncScriptRunner | None = None
        #: Reports each node's breaker (``Runtime.watch``); a Cluster's runners keep one
        #: per node, made on first use.
        self.watch: Callable[[Breaker], Breaker] = lambda breaker: breaker
        self._breakers: dict[str, Breaker] = {}
        self._breakers_lock = threading.Lock()

    def breaker_of(self, node: str) -> Breaker:
        """The breaker of one node of a Cluster."""
        breaker = self._breakers.get(node)
        if breaker is None:
            with self._breakers_lock:
                breaker = self._breakers.get(node)
                if breaker is None:
                    breaker = self._breakers[node] = self.watch(Breaker(self.timeout, node=node))
        return breaker

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
                self._sync = RedisScripts(
                    self._sync_client(),
                    timeout=self.timeout,
                    deadlines=self._server is None,
                    breaker_of=self.breaker_of,
                )
        return self._sync

    def aio(self) -> AsyncScriptRunner:
        if self._async is None:
            if self._endpoint is not None:
                self._async = MultiplexedScripts(self._endpoint)
            else:
                self._async = PerLoopRedisScripts(
                    lambda: AsyncRedisScripts(
                        self._async_client(),
                        max_in_flight=self.max_connections,
                        wait=self.timeout,
                        # In-process fakeredis runs a call at once: none can outlive its caller.
                        deadlines=self._server is None,
                        breaker_of=self.breaker_of,
                    )
                )
        return self._async

    def _sync_client(self) -> Any:
        if self._server is not None:
            import fakeredis

            return fakeredis.FakeRedis(server=self._server, decode_responses=True)
        if self._seeds is None:
            return redis.Redis.from_url(
                self.client_url,
                retry=Retry(NoBackoff(), 0),
                connection_class=budgeted(_CONNECTION_CLASSES.get(self.kind, Connection)),
                **self._redis_options(),
            )
        first, seeds = self._seeds
        # A rediss:// URL would make redis-py put its own TLS class in place of this one;
        # as redis:// (its TLS options kept), the nodes' pools take the budgeted TLS class.
        tls = first.startswith("rediss://")
        return redis.cluster.RedisCluster.from_url(
            "redis://" + first.removeprefix("rediss://") if tls else first,
            startup_nodes=[cast(Any, redis.cluster).ClusterNode(h, p) for h, p in seeds[1:]],
            retry=Retry(NoBackoff(), 0),
            connection_class=budgeted(SSLConnection if tls else Connection),
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
        return AsyncCluster.from_url(
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
