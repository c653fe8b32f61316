"""The lean asyncio client: every task of an event loop on one connection.

Commands are written as they come and replies resolve their callers in order, so
concurrent calls share round trips instead of queueing for pooled connections.
Framing, endpoints and error replies are :mod:`usage_guard.wire`'s.
"""

from __future__ import annotations

import asyncio
import time
from asyncio import get_running_loop
from collections import deque
from collections.abc import AsyncGenerator
from typing import Any, cast

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .servertime import LATE_REPLY, TIME, ServerClock
from .wire import Endpoint, checked, eval_source, evalsha, is_noscript, new_reader, pack

#: Seconds a connection given up on (a reply came too late) keeps reading the replies
#: still owed to it. Redis runs every command it has read, but once a reply meets a
#: closed socket it drops the connection with what it had not read yet; kept open, the
#: commands already sent all run, and their scripts apply what their callers were told
#: (see usage_guard.servertime).
DRAIN_TIME = 30.0


class _Multiplexed(asyncio.Protocol):
    """One asyncio connection carrying many calls; replies come back in request order.

    Timeouts are kept by one watchdog timer per connection rather than one timer
    per call (which would cost about 2 µs a call): it wakes when the oldest
    waiting call is due, and as replies come in order, a late oldest call means
    the connection is stuck and every call on it fails. The connection then takes no
    more calls but reads the late replies for up to :data:`DRAIN_TIME` seconds.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.reader = new_reader()
        #: Each call's future and the loop time by which its reply is due.
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._closer: AsyncGenerator[None, None] | None = None
        #: Set while the transport's buffer is over its high-water mark: Redis reads
        #: slower than callers write, and new calls wait instead of growing the buffer.
        self.full: asyncio.Future[None] | None = None
        #: The server's clock, read before the connection's first consumption.
        self.clock: ServerClock | None = None

    async def read_clock(self) -> None:
        reply = checked(await self.send(TIME))
        self.clock = ServerClock.reading(reply, time.monotonic())

    def deadline(self, until: float | None) -> int:
        """The moment, by the server's clock, before which a call sent now is not given up
        on: its own due time, or the oldest waiting call's (when that one is late, every
        call on the connection fails), or ``until`` (``loop.time()``), whichever is first."""
        assert self.clock is not None
        gives_up = self.loop.time() + self.timeout
        if self.waiting:
            gives_up = min(gives_up, self.waiting[0][1])
        if until is not None:
            gives_up = min(gives_up, until)
        return self.clock.deadline(gives_up)

    async def close_with_the_loop(self) -> None:
        """Close this connection when its loop shuts down, even if nobody calls ``close()``.

        ``asyncio.run`` (and uvloop, and anyio) finalise every live async generator
        before closing the loop; once the loop is closed a transport can no longer
        be closed and its socket would leak until garbage collection.
        """
        self._closer = self._until_shutdown()
        await anext(self._closer)

    async def _until_shutdown(self) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            self.abort(RedisConnectionError("the event loop shut down"))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def pause_writing(self) -> None:
        if self.full is None:
            self.full = self.loop.create_future()

    def resume_writing(self) -> None:
        full, self.full = self.full, None
        if full is not None and not full.done():
            full.set_result(None)

    async def room(self) -> None:
        """Wait until the transport takes more writes, up to the timeout."""
        while self.full is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.full), self.timeout)
            except asyncio.TimeoutError:
                raise RedisTimeoutError("Redis did not read within the timeout") from None

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            reply = self.reader.gets()
            while reply is not False:
                waiter = self.waiting.popleft()[0]
                if not waiter.done():
                    waiter.set_result(reply)
                reply = self.reader.gets()
        except hiredis.ProtocolError as error:
            self.abort(RedisConnectionError(f"unreadable reply from Redis: {error}"))
        if self.closed and not self.waiting:  # drained: every late reply is in
            self.abort(RedisConnectionError("the connection was given up on"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.abort(RedisConnectionError("lost the connection to Redis"))

    def abort(self, error: Exception) -> None:
        """Close the connection and fail every call still waiting on it."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self.resume_writing()  # callers waiting for room then find the connection closed
        while self.waiting:
            waiter = self.waiting.popleft()[0]
            if not waiter.done():
                waiter.set_exception(error)

    def send(self, command: bytes) -> asyncio.Future[Any]:
        """Write one command; the future gets its reply (an error reply as a value)."""
        assert self.transport is not None
        # is_closing(): the transport lost its socket, connection_lost() is still to come.
        if self.closed or self.transport.is_closing():
            raise RedisConnectionError("lost the connection to Redis")
        waiter = self.loop.create_future()
        self.transport.write(command)
        due = self.loop.time() + self.timeout
        self.waiting.append((waiter, due))
        if self._watchdog is None:
            self._watchdog = self.loop.call_at(due, self._watch)
        return waiter

    def _watch(self) -> None:
        self._watchdog = None
        if not self.waiting:
            return
        due = self.waiting[0][1]
        if due <= self.loop.time():
            self.give_up(RedisTimeoutError("Redis did not answer within the timeout"))
        else:
            self._watchdog = self.loop.call_at(due, self._watch)

    @property
    def draining(self) -> bool:
        """Given up on, but still reading the replies owed to it."""
        return self.closed and self.transport is not None and not self.transport.is_closing()

    def give_up(self, error: Exception) -> None:
        """Fail every waiting call and take no new ones, but keep reading their replies
        (see :data:`DRAIN_TIME`); closed when they are all in, or when that time is up."""
        self.closed = True
        self.resume_writing()
        for waiter, _ in self.waiting:
            if not waiter.done():
                waiter.set_exception(error)
        self._watchdog = self.loop.call_later(DRAIN_TIME, self.abort, error)


class MultiplexedScripts:
    """Runs the package's scripts for every task of an event loop on one connection.

    Each event loop gets its own connection (a transport belongs to one loop), so
    loops in several threads, or one after another, each keep theirs.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        #: The connection used last: the fast path while one loop does all the calls.
        self._connection: _Multiplexed | None = None
        self._by_loop: dict[asyncio.AbstractEventLoop, _Multiplexed] = {}
        #: Connections given up on that still read their late replies (see DRAIN_TIME).
        self._draining: set[_Multiplexed] = set()
        self._connecting: dict[asyncio.AbstractEventLoop, asyncio.Task[_Multiplexed]] = {}

    async def run(
        self,
        script: str,
        keys: list[str],
        args: list[str | int],
        wait: float | None = None,
        deadline_arg: int | None = None,
    ) -> Any:
        if wait is None:
            return await self._run(script, keys, args, deadline_arg)
        # A later call of a request, with less than the timeout left: given up on as a
        # whole (connecting included); its reply, if it comes, is read and dropped.
        until = get_running_loop().time() + wait
        try:
            return await asyncio.wait_for(self._run(script, keys, args, deadline_arg, until), wait)
        except asyncio.TimeoutError:
            raise RedisTimeoutError("Redis did not answer within this request's time") from None

    async def _run(
        self,
        script: str,
        keys: list[str],
        args: list[str | int],
        deadline_arg: int | None,
        until: float | None = None,
    ) -> Any:
        connection = self._connection
        if connection is None or connection.closed or connection.loop is not get_running_loop():
            connection = await self._connect()
        if connection.full is not None:
            await connection.room()
        if deadline_arg is not None:
            clock = connection.clock
            if clock is None or clock.stale(time.monotonic()):
                await connection.read_clock()
            # No await from here to the send: the deadline stands for this very send.
            args[deadline_arg] = connection.deadline(until)
        reply = await connection.send(evalsha(script, keys, args))
        if is_noscript(reply):
            if deadline_arg is not None:
                args[deadline_arg] = connection.deadline(until)
            reply = await connection.send(eval_source(script, keys, args))
        if deadline_arg is not None and reply == LATE_REPLY:
            connection.clock = None  # the deadline came early: the reading was slow
        return checked(reply)

    async def command(self, *args: str | int) -> Any:
        """Any other command, e.g. ``await command("HGET", key, field)``."""
        connection = await self._connect()
        if connection.full is not None:
            await connection.room()
        return checked(await connection.send(pack(*args)))

    async def _connect(self) -> _Multiplexed:
        """The running loop's connection, opened if it has none that works."""
        loop = get_running_loop()
        connection = self._by_loop.get(loop)
        if connection is not None and not connection.closed:
            self._connection = connection
            return connection
        connecting = self._connecting.get(loop)
        if connecting is None:
            # Concurrent first calls wait for one connection instead of opening many.
            connecting = self._connecting[loop] = loop.create_task(self._open(loop))
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting.get(loop) is connecting:
                del self._connecting[loop]

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Multiplexed:
        endpoint = self.endpoint
        try:
            transport, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Multiplexed(loop, endpoint.timeout),
                    endpoint.host,
                    endpoint.port,
                    ssl=endpoint.tls,
                    server_hostname=endpoint.host if endpoint.tls else None,
                ),
                endpoint.timeout,
            )
        except asyncio.TimeoutError as error:
            raise RedisTimeoutError(f"connecting to Redis at {endpoint} timed out") from error
        except OSError as error:
            raise RedisConnectionError(f"cannot connect to Redis at {endpoint}: {error}") from error
        # uvloop may call connection_made() only after create_connection() has returned.
        connection.transport = transport
        await connection.close_with_the_loop()
        try:
            for command in endpoint.handshake:
                checked(await connection.send(command))
        except BaseException:
            connection.abort(RedisConnectionError("the connection's handshake failed"))
            raise
        # Loops closed by hand without closing theirs (asyncio.run closes them): nothing
        # can close a transport of a closed loop, so their connections are dropped.
        self._by_loop = {
            other: kept for other, kept in self._by_loop.items() if not other.is_closed()
        }
        replaced = self._by_loop.get(loop)
        self._draining = {
            kept for kept in {*self._draining, replaced} if kept is not None and kept.draining
        }
        self._by_loop[loop] = self._connection = connection
        return connection

    async def close(self) -> None:
        """Close the running loop's connections (another loop's are left to that loop),
        those still reading late replies too."""
        loop = get_running_loop()
        for draining in [c for c in self._draining if c.loop is loop]:
            self._draining.discard(draining)
            draining.abort(RedisConnectionError("the client is closed"))
        connection = self._by_loop.pop(loop, None)
        if connection is not None:
            if self._connection is connection:
                self._connection = None
            connection.abort(RedisConnectionError("the client is closed"))
