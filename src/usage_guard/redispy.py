"""redis-py's clients as script runners: ``redis+cluster://`` URLs and ``client=redis-py``.

Scripts go through ``EVALSHA`` and load again after NOSCRIPT; on a cluster, a call
whose slot is being migrated (``ASK`` / ``TRYAGAIN`` / a moved slot) is tried again
within the guard's timeout, and commands without a key (``ping()``'s probes) are
routed to a node.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.exceptions import AskError, ClusterError, NoScriptError, TryAgainError

from .scripts import SOURCES

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

    def run(
        self, script: str, keys: list[str], args: list[str | int], wait: float | None = None
    ) -> Any:
        # ``wait`` bounds the tries during a slot migration; each reply is bounded by the
        # client's socket timeout, which redis-py's sync clients fix per connection.
        deadline = time.monotonic() + (self._timeout if wait is None else wait)
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

    async def run(
        self, script: str, keys: list[str], args: list[str | int], wait: float | None = None
    ) -> Any:
        deadline = time.monotonic() + (self._wait if wait is None else wait)
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
