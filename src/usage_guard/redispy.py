"""redis-py's clients as script runners: ``redis+cluster://`` URLs and ``client=redis-py``.

Scripts go through ``EVALSHA`` and load again after NOSCRIPT; on a cluster, a call
whose slot is being migrated (``ASK`` / ``TRYAGAIN`` / a moved slot) is tried again
within the guard's timeout, and commands without a key (``ping()``'s probes) are
routed to a node.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, Callable
from contextvars import ContextVar
from typing import Any, cast

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
import redis.connection
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterError,
    NoScriptError,
    ResponseError,
    TryAgainError,
)
from redis.utils import SENTINEL

from .faults import CircuitOpen, Fault, classify
from .runtime import PROBE_INTERVAL, Breaker
from .scripts import SOURCES
from .servertime import LATE_REPLY, ServerClock

#: Seconds before trying again a script whose slot is being migrated: the first wait,
#: doubled each time up to the second.
RESHARD_DELAYS = (0.01, 0.05)
#: When (``time.monotonic()``) the current sync call is given up on: see :func:`budgeted`.
_gives_up: ContextVar[float | None] = ContextVar("usage_guard_gives_up", default=None)


class _Budgeted(redis.connection.AbstractConnection):
    """Connecting (a TLS handshake included) and reading that end when the current call
    is given up on (see :func:`budgeted`), and connecting only to send a command."""

    def connect(self) -> None:
        """Nothing: a connection connects when it sends its first command (redis-py's
        ``send_packed_command`` does, with no socket), so that a failure to connect is
        the command's, not the pool's.

        redis-py's pool connects each connection it hands out, and its cluster client
        asks it again after a TRYAGAIN, ASK or MOVED reply. When that connect fails
        (a budgeted one soon does), ``RedisCluster._execute_command`` (redis-py 8.1,
        redis/cluster.py lines 1751, 1848, 1994 and 2009) disconnects and releases a
        second time the connection of its previous try, still named by ``connection``,
        which the pool may have handed to another thread meanwhile: two threads then
        share one socket and read each other's replies (a consume a clock reading's).
        """

    def can_read(self, timeout: float = 0) -> bool:
        # Unconnected: nothing to read (and no connecting here either, see connect()).
        return self._sock is not None and bool(super().can_read(timeout))

    def _connect(self):  # type: ignore[no-untyped-def]
        gives_up = _gives_up.get()
        if gives_up is None:
            return super()._connect()  # type: ignore[safe-super,no-untyped-call]
        left = max(0.001, gives_up - time.monotonic())
        saved = self.socket_connect_timeout, self.socket_timeout
        self.socket_connect_timeout = min(saved[0] or left, left)
        self.socket_timeout = min(saved[1] or left, left)
        try:
            sock = super()._connect()  # type: ignore[safe-super,no-untyped-call]
        finally:
            self.socket_connect_timeout, self.socket_timeout = saved
        sock.settimeout(self.socket_timeout)
        return sock

    def read_response(  # type: ignore[no-untyped-def]
        self, disable_decoding=False, *, timeout=SENTINEL, **options
    ):
        gives_up = _gives_up.get()
        if gives_up is not None and timeout is SENTINEL:
            timeout = max(0.001, gives_up - time.monotonic())
        return super().read_response(disable_decoding, timeout=timeout, **options)


def budgeted(connection_class: type[Any]) -> type[Any]:
    """``connection_class`` whose replies are awaited no longer than the current call may
    wait: redis-py's sync clients otherwise fix their socket timeout per connection, and
    a request's later call could wait a whole ``timeout`` more."""
    return type(f"Budgeted{connection_class.__name__}", (_Budgeted, connection_class), {})


def _slot_moving(error: Exception) -> bool:
    """Whether ``error`` means the script did not run because its slot is being migrated.

    redis-py follows MOVED, ASK and TRYAGAIN itself, 16 times at most, then raises a
    bare ``ClusterError("TTL exhausted.")``; its subclass ``ClusterDownError`` is an
    outage, not a migration. A timeout or connection error never qualifies: the script
    may have run, and running it again would count twice.
    """
    return isinstance(error, (TryAgainError, AskError)) or type(error) is ClusterError


#: What redis-py raises for a node's error replies (LOADING among them), and for
#: redirects that did not settle.
_ANSWERS = (ResponseError, ClusterError, BusyLoadingError)


def _node_of(error: Exception, sent_to: str) -> str:
    """The node a failed call last reached: redis-py names it on the error when it
    followed a redirect (``error.connection``: a node or a connection)."""
    reached = getattr(error, "connection", None)
    name = getattr(reached, "name", None)
    if isinstance(name, str):
        return name
    host, port = getattr(reached, "host", None), getattr(reached, "port", None)
    return f"{host}:{port}" if host is not None and port is not None else sent_to


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


class _Nodes:
    """What a runner keeps of each server a redis-py client talks to, by node name ('' for
    a single server): its clock (see :mod:`usage_guard.servertime`), read on first use,
    again when stale and after a call to it failed (redis-py reconnects, and a failover
    moves slots, out of sight), and on a cluster its breaker: a hung or dead master fails
    fast for its own orgs only."""

    def __init__(
        self, client: Any, *, clocks: bool, breaker_of: Callable[[str], Breaker] | None
    ) -> None:
        self.client = client
        self.cluster = isinstance(
            client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster)
        )
        #: Whether calls carry deadlines (in-process fakeredis runs a call at once).
        self.clocks = clocks
        self._clocks: dict[str, ServerClock] = {}
        self._breaker_of = breaker_of if self.cluster else None
        self._next_rediscovery = 0.0

    def of(self, keys: list[str]) -> str:
        """The name of the node a call on ``keys`` goes to."""
        return str(self.client.get_node_from_key(keys[0]).name) if self.cluster else ""

    def admit(self, node: str) -> None:
        """Raise :class:`CircuitOpen` while ``node``'s breaker refuses calls."""
        if self._breaker_of is not None:
            breaker = self._breaker_of(node)
            if breaker.open and not breaker.admits():
                self._rediscover(node)
                raise CircuitOpen(f"{node} failed and is not asked again until a probe answers")

    def _rediscover(self, failed: str) -> None:
        """Learn the slots again, the other nodes asked first, at most once a probe
        interval: calls refused by a breaker reach no node, so nothing else would tell
        the async client that a replica took the failed master's slots over. (The sync
        client rediscovers inside every failed call, a probe's too.)"""
        if not isinstance(self.client, AsyncCluster):
            return
        now = time.monotonic()
        if now >= self._next_rediscovery:
            self._next_rediscovery = now + PROBE_INTERVAL
            self.client.rediscover(failed)

    def clock(self, node: str) -> ServerClock | None:
        """The node's clock, None when it must be read first."""
        clock = self._clocks.get(node)
        return None if clock is None or clock.stale(time.monotonic()) else clock

    def read_clock(self, node: str, reply: Any) -> ServerClock:
        """Remember the clock that ``reply`` (lua/clock.lua's, run on ``node``) gives."""
        clock = self._clocks[node] = ServerClock.reading(reply, time.monotonic())
        return clock

    def answered(self, node: str, reply: Any) -> None:
        if reply == LATE_REPLY:  # the deadline came early: the clock reading was slow
            self._clocks.pop(node, None)
        if self._breaker_of is not None:
            self._breaker_of(node).answered()

    def failed(self, node: str, error: Exception, waited: float) -> None:
        """``node`` (where the call was sent) failed, or the node redis-py followed a
        redirect to, when the error names it, after ``waited`` seconds of the
        ``timeout`` the breakers' probes wait."""
        node = _node_of(error, node)
        self._clocks.pop(node, None)
        if self._breaker_of is not None:
            breaker = self._breaker_of(node)
            if isinstance(error, redis.TimeoutError) and waited < breaker.timeout / 2:
                return  # the call's own time ran out (tries during a slot migration)
            # Only silence opens a node's breaker: an error reply costs no wait, and one
            # such as CLUSTERDOWN, a whole cluster's for a moment, says nothing of the node.
            if classify(error) is Fault.OUTAGE and not isinstance(error, _ANSWERS):
                breaker.failed()
                if isinstance(self.client, AsyncCluster):
                    self.client.failed_node = node
            else:
                breaker.answered()


class AsyncCluster(redis.asyncio.cluster.RedisCluster):
    """redis-py's asyncio cluster client, rediscovering the cluster in the background
    after a node failed.

    redis-py rediscovers on the next call after a failure, whichever org it is for,
    holding every other call until it is done, and asks the nodes in random order: with
    one master hung, that call and every call behind it could wait a whole timeout, and
    the orgs of healthy masters be refused. Here calls go on with the slots they know
    (a moved slot still answers MOVED, which redis-py follows) while one rediscovery
    at a time asks the other nodes first.
    """

    _discovered = False
    _rediscovery: asyncio.Task[None] | None = None
    #: The node that failed last (a runner sets it): asked last when rediscovering.
    failed_node: str | None = None

    async def initialize(
        self,
        additional_startup_nodes_info: list[tuple[str, int]] | None = None,
        last_failed_node_name: str | None = None,
    ) -> AsyncCluster:
        if not (self._initialize and self._discovered):
            await super().initialize(additional_startup_nodes_info, last_failed_node_name)
            self._discovered = True
            return self
        self._initialize = False
        self.rediscover(last_failed_node_name or self.failed_node)
        return self

    def rediscover(self, failed: str | None) -> None:
        """Start a rediscovery that asks ``failed`` last, unless one is under way."""
        if self._rediscovery is None or self._rediscovery.done():
            self._rediscovery = asyncio.ensure_future(self._rediscover(failed))

    async def _rediscover(self, failed: str | None) -> None:
        try:
            await self.nodes_manager.initialize(last_failed_node_name=failed)
        except Exception:
            self._initialize = True  # the next call starts another one

    async def aclose(self) -> None:
        rediscovery, self._rediscovery = self._rediscovery, None
        if rediscovery is not None:
            rediscovery.cancel()
            await asyncio.gather(rediscovery, return_exceptions=True)
        self._discovered = False  # closed: the next call discovers the cluster anew
        # redis-py closes nothing while a failure has left it due to rediscover.
        self._initialize = False
        await super().aclose()


class RedisScripts:
    """Runs the package's scripts on a redis-py client (cluster, ``client=redis-py``) or
    fakeredis: one EVALSHA each.

    EVALSHA is sent directly (``Script.__call__`` costs about 10 µs more per call);
    on NOSCRIPT (a flushed or new server) the registered ``Script`` loads and runs it.
    While the slot of a call's keys is being migrated, the call is tried again until
    ``timeout`` seconds have passed since it began.
    """

    def __init__(
        self,
        client: Any,
        *,
        timeout: float,
        deadlines: bool = True,
        breaker_of: Callable[[str], Breaker] | None = None,
    ) -> None:
        self.client = client
        self._scripts = {name: client.register_script(src) for name, src in SOURCES.items()}
        self._timeout = timeout
        self._nodes = _Nodes(client, clocks=deadlines, breaker_of=breaker_of)

    def run(
        self,
        script: str,
        keys: list[str],
        args: list[str | int],
        wait: float | None = None,
        deadline_arg: int | None = None,
    ) -> Any:
        # The call as a whole ends at its deadline: the tries during a slot migration, and
        # (the client's connections are budgeted, see budgeted()) each connect and read,
        # those of redis-py's own rediscovery after a failure included.
        deadline = time.monotonic() + (self._timeout if wait is None else wait)
        token = _gives_up.set(deadline)
        try:
            return self._tries(script, keys, args, deadline, deadline_arg)
        finally:
            _gives_up.reset(token)

    def _tries(
        self,
        script: str,
        keys: list[str],
        args: list[str | int],
        deadline: float,
        deadline_arg: int | None,
    ) -> Any:
        delay = RESHARD_DELAYS[0]
        nodes = self._nodes
        while True:
            node = nodes.of(keys)
            nodes.admit(node)
            attempt = time.monotonic()
            try:
                if deadline_arg is not None and nodes.clocks:
                    clock = nodes.clock(node) or nodes.read_clock(
                        node, self._evalsha("clock", keys[:1], [])
                    )
                    gives_up = min(time.monotonic() + self._timeout, deadline)
                    args[deadline_arg] = clock.deadline(gives_up)
                reply = self._evalsha(script, keys, args)
            except Exception as error:
                nodes.failed(node, error, time.monotonic() - attempt)
                if not _slot_moving(error) or time.monotonic() + delay > deadline:
                    raise
            else:
                nodes.answered(node, reply)
                return reply
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

    def __init__(
        self,
        client: Any,
        *,
        max_in_flight: int,
        wait: float,
        deadlines: bool = True,
        breaker_of: Callable[[str], Breaker] | None = None,
    ) -> None:
        self.client = client
        self._scripts = {name: client.register_script(src) for name, src in SOURCES.items()}
        self._turns = asyncio.Semaphore(max_in_flight)
        self._wait = wait
        self._nodes = _Nodes(client, clocks=deadlines, breaker_of=breaker_of)
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

    async def run(
        self,
        script: str,
        keys: list[str],
        args: list[str | int],
        wait: float | None = None,
        deadline_arg: int | None = None,
    ) -> Any:
        # The loop's clock, as its timers are: see usage_guard.servertime.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._wait if wait is None else wait)
        if not self._connected:
            await self._connect()
        node = self._nodes.of(keys)
        self._nodes.admit(node)
        if self._turns.locked():
            try:
                await asyncio.wait_for(self._turns.acquire(), deadline - loop.time())
            except asyncio.TimeoutError:
                raise redis.ConnectionError("no connection free within the timeout") from None
        else:
            await self._turns.acquire()
        call = asyncio.ensure_future(self._tries(script, keys, args, deadline, deadline_arg, node))
        self._pending.add(call)
        call.add_done_callback(self._finished)
        done, _ = await asyncio.wait((call,), timeout=deadline - loop.time())
        if not done:  # the call goes on, and tells the node's breaker how it ended
            raise redis.TimeoutError("Redis Cluster did not answer within the timeout")
        return call.result()

    def _finished(self, call: asyncio.Future[Any]) -> None:
        self._turns.release()
        self._pending.discard(call)
        if not call.cancelled():
            call.exception()  # read: a call given up on must not log "never retrieved"

    async def _tries(
        self,
        script: str,
        keys: list[str],
        args: list[str | int],
        deadline: float,
        deadline_arg: int | None,
        node: str,
    ) -> Any:
        """The call, tried again while its slot moves. It goes on after its caller gave up
        at ``deadline`` (``loop.time()``), which its script is told."""
        loop = asyncio.get_running_loop()
        delay = RESHARD_DELAYS[0]
        nodes = self._nodes
        while True:
            attempt = loop.time()
            try:
                if deadline_arg is not None and nodes.clocks:
                    clock = nodes.clock(node) or nodes.read_clock(
                        node, await self._evalsha("clock", keys[:1], [])
                    )
                    args[deadline_arg] = clock.deadline(min(loop.time() + self._wait, deadline))
                reply = await self._evalsha(script, keys, args)
            except Exception as error:
                nodes.failed(node, error, loop.time() - attempt)
                if not _slot_moving(error) or loop.time() + delay > deadline:
                    raise
            else:
                nodes.answered(node, reply)
                return reply
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESHARD_DELAYS[1])
            node = nodes.of(keys)

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


class PerLoopRedisScripts:
    """One :class:`AsyncRedisScripts` per event loop, closed when its loop shuts down.

    redis-py's async clients, their connections and locks belong to the loop that first
    used them, and some applications run one loop after another: asgiref runs each
    async view of a WSGI app (Django, Flask) in a loop of its own.
    """

    def __init__(self, make: Callable[[], AsyncRedisScripts]) -> None:
        self._make = make
        #: The loop used last and its scripts: the fast path while one loop makes every call.
        self._last: tuple[asyncio.AbstractEventLoop, AsyncRedisScripts] | None = None
        self._by_loop: dict[asyncio.AbstractEventLoop, AsyncRedisScripts] = {}
        #: Each loop's finaliser (an async generator: asyncio.run closes them at shutdown).
        self._closers: dict[asyncio.AbstractEventLoop, AsyncGenerator[None, None]] = {}
        #: Loops run in several threads: the two dicts change under it.
        self._lock = threading.Lock()

    async def _current(self) -> AsyncRedisScripts:
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0] is loop:
            return last[1]
        scripts = self._by_loop.get(loop)
        if scripts is None:
            scripts, closer = self._make(), self._until_shutdown(loop)
            with self._lock:
                # A loop closed without asyncio.run's shutdown never told us: forget it
                # (its connections can no longer be closed; they go with the garbage).
                for closed in [known for known in self._by_loop if known.is_closed()]:
                    self._by_loop.pop(closed, None)
                    self._closers.pop(closed, None)
                self._by_loop[loop], self._closers[loop] = scripts, closer
            await anext(closer)
        self._last = (loop, scripts)
        return scripts

    async def _until_shutdown(self, loop: asyncio.AbstractEventLoop) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            await self._forget(loop)

    async def _forget(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            scripts = self._by_loop.pop(loop, None)
            self._closers.pop(loop, None)
        if self._last is not None and self._last[0] is loop:
            self._last = None
        if scripts is not None:
            await scripts.close()

    async def run(
        self,
        script: str,
        keys: list[str],
        args: list[str | int],
        wait: float | None = None,
        deadline_arg: int | None = None,
    ) -> Any:
        scripts = await self._current()
        return await scripts.run(script, keys, args, wait, deadline_arg)

    async def command(self, *args: str | int) -> Any:
        return await (await self._current()).command(*args)

    async def close(self) -> None:
        """Close the running loop's client (another loop's closes with that loop)."""
        await self._forget(asyncio.get_running_loop())
