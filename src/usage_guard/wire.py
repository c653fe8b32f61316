"""A lean Redis client for the hot path: one command, one reply, RESP2 through hiredis.

Used for ``redis://`` and ``rediss://`` URLs. redis-py spends about 30 µs of
Python per call in its pool, retry and callback layers; these clients pack the
command with ``hiredis.pack_command``, write it and parse the reply with a
``hiredis.Reader``, so a call costs the round trip and little else.

* :class:`SocketScripts` (sync) keeps a stack of idle blocking sockets, so
  threads never share one. A socket that failed or timed out is closed, never
  reused: a late reply would be read as the answer to the next call.
* :class:`MultiplexedScripts` (asyncio) multiplexes every task of an event loop
  on one connection: commands are written as they come and replies resolve
  their callers in order, so concurrent calls share round trips instead of
  queueing for pooled connections.

Neither retries anything (a timed-out script may have run, and a retry would
count twice). Every error reply is raised as the exception class redis-py's own
parser gives it (its table, borrowed), so one error table serves every client.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from asyncio import get_running_loop
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, cast

import hiredis
from redis._parsers.base import BaseParser
from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .scripts import SHAS, SOURCES

#: Bytes read from a socket at a time; the hot path's replies are far smaller.
READ_SIZE = 65536
#: What the lean client reads of a URL (as redis-py's ``parse_url`` names it).
_READ_OPTIONS = frozenset(
    {"host", "port", "username", "password", "db", "connection_class"}
    | {"ssl_ca_certs", "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile"}
)
#: Idle sync sockets kept for reuse; past it a returned socket is closed, so a burst of
#: many threads does not hold as many Redis connections for ever.
IDLE_SOCKETS = 16


@dataclass(frozen=True)
class Endpoint:
    """Where a ``redis://`` or ``rediss://`` URL points and how a session there starts."""

    host: str
    port: int
    tls: ssl.SSLContext | None
    #: Packed AUTH / SELECT commands sent first on every new connection.
    handshake: tuple[bytes, ...]
    timeout: float

    @classmethod
    def from_url(cls, url: str, timeout: float) -> Endpoint:
        """Read ``url`` as redis-py does; raise :class:`LookupError` naming the options this
        client does not follow (redis-py, ``?client=redis-py``, does)."""
        options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        unread = sorted(set(options) - _READ_OPTIONS)
        if unread:
            raise LookupError(", ".join(unread))
        tls = None
        if url.startswith("rediss://"):
            tls = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
            if options.get("ssl_cert_reqs") in ("none", ssl.CERT_NONE):
                tls.check_hostname = False
                tls.verify_mode = ssl.CERT_NONE
            if options.get("ssl_certfile"):  # a client certificate, for mutual TLS
                tls.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
        handshake = []
        if options.get("password") is not None:
            credentials = (options.get("username") or "default", options["password"])
            handshake.append(pack("AUTH", *credentials))
        if options.get("db"):
            handshake.append(pack("SELECT", options["db"]))
        return cls(
            host=options.get("host", "localhost"),
            port=int(options.get("port", 6379)),
            tls=tls,
            handshake=tuple(handshake),
            timeout=timeout,
        )

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def pack(*args: str | int) -> bytes:
    """One command in RESP (hiredis' stub types the tuple as one element)."""
    return cast(bytes, hiredis.pack_command(cast(Any, args)))


def evalsha(script: str, keys: list[str], args: list[str | int]) -> bytes:
    return pack("EVALSHA", SHAS[script], len(keys), *keys, *args)


def eval_source(script: str, keys: list[str], args: list[str | int]) -> bytes:
    """EVAL of the whole source: runs the script and caches it on the server again."""
    return pack("EVAL", SOURCES[script], len(keys), *keys, *args)


def is_noscript(reply: Any) -> bool:
    return isinstance(reply, NoScriptError)


def checked(reply: Any) -> Any:
    """The reply, or the error reply it is raised."""
    if isinstance(reply, RedisError):
        raise reply
    return reply


def _new_reader() -> hiredis.Reader:
    # Error replies become the exception redis-py's own parser makes of them
    # (``-OOM`` an OutOfMemoryError, ``-LOADING`` a BusyLoadingError, ...), as values.
    return hiredis.Reader(replyError=BaseParser.parse_error, encoding="utf-8")


class _Socket:
    """One blocking connection; after any error it is unusable and the caller closes it."""

    def __init__(self, endpoint: Endpoint) -> None:
        try:
            sock = socket.create_connection((endpoint.host, endpoint.port), endpoint.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if endpoint.tls is not None:
                sock = endpoint.tls.wrap_socket(sock, server_hostname=endpoint.host)
        except TimeoutError as error:
            raise RedisTimeoutError(f"connecting to Redis at {endpoint} timed out") from error
        except OSError as error:
            raise RedisConnectionError(f"cannot connect to Redis at {endpoint}: {error}") from error
        self.sock = sock
        self.reader = _new_reader()
        try:
            for command in endpoint.handshake:
                checked(self.call(command))
        except BaseException:
            self.close()
            raise

    def call(self, command: bytes) -> Any:
        try:
            self.sock.sendall(command)
            reply = self.reader.gets()
            while reply is False:
                data = self.sock.recv(READ_SIZE)
                if not data:
                    raise RedisConnectionError("Redis closed the connection")
                self.reader.feed(data)
                reply = self.reader.gets()
        except TimeoutError as error:
            raise RedisTimeoutError("Redis did not answer within the timeout") from error
        except (OSError, hiredis.ProtocolError) as error:
            raise RedisConnectionError(f"lost the connection to Redis: {error}") from error
        return reply

    def close(self) -> None:
        self.sock.close()


class SocketScripts:
    """Runs the package's scripts over plain sockets, one EVALSHA per call (sync)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._idle: list[_Socket] = []
        self._pid = os.getpid()

    def run(self, script: str, keys: list[str], args: list[str | int]) -> Any:
        # hiredis' stub types the tuple as one element.
        command = hiredis.pack_command(("EVALSHA", SHAS[script], len(keys), *keys, *args))  # type: ignore[arg-type]
        return self._exchange(command, script, keys, args)

    def command(self, *args: str | int) -> Any:
        """Any other command, e.g. ``command("HGET", key, field)``."""
        return self._exchange(pack(*args))

    def _exchange(
        self,
        command: bytes,
        script: str | None = None,
        keys: list[str] | None = None,
        args: list[str | int] | None = None,
    ) -> Any:
        """Send ``command`` on an idle socket (a new one if none); a script the server
        does not know yet (NOSCRIPT) is sent once more, whole."""
        if self._pid != os.getpid():
            # A forked child must not talk on its parent's sockets.
            self._idle, self._pid = [], os.getpid()
        connection = self._idle.pop() if self._idle else _Socket(self.endpoint)
        try:
            reply = connection.call(command)
            if script is not None and isinstance(reply, NoScriptError):
                reply = connection.call(eval_source(script, keys or [], args or []))
        except BaseException:
            connection.close()
            raise
        if len(self._idle) < IDLE_SOCKETS:
            self._idle.append(connection)
        else:
            connection.close()
        return checked(reply)

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


class _Multiplexed(asyncio.Protocol):
    """One asyncio connection carrying many calls; replies come back in request order.

    Timeouts are kept by one watchdog timer per connection rather than one timer
    per call (which would cost about 2 µs a call): it wakes when the oldest
    waiting call is due, and as replies come in order, a late oldest call means
    the connection is stuck and every call on it fails.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.reader = _new_reader()
        #: Each call's future and the loop time by which its reply is due.
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._closer: AsyncGenerator[None, None] | None = None
        #: Set while the transport's buffer is over its high-water mark: Redis reads
        #: slower than callers write, and new calls wait instead of growing the buffer.
        self.full: asyncio.Future[None] | None = None

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
            self.abort(RedisTimeoutError("Redis did not answer within the timeout"))
        else:
            self._watchdog = self.loop.call_at(due, self._watch)


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
        self._connecting: dict[asyncio.AbstractEventLoop, asyncio.Task[_Multiplexed]] = {}

    async def run(self, script: str, keys: list[str], args: list[str | int]) -> Any:
        connection = self._connection
        if connection is None or connection.closed or connection.loop is not get_running_loop():
            connection = await self._connect()
        if connection.full is not None:
            await connection.room()
        reply = await connection.send(evalsha(script, keys, args))
        if is_noscript(reply):
            reply = await connection.send(eval_source(script, keys, args))
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
        stale = self._by_loop.get(loop)
        if stale is not None:
            stale.abort(RedisConnectionError("replaced by a new connection"))
        # Loops closed by hand without closing theirs (asyncio.run closes them): nothing
        # can close a transport of a closed loop, so their connections are dropped.
        self._by_loop = {
            other: kept for other, kept in self._by_loop.items() if not other.is_closed()
        }
        self._by_loop[loop] = self._connection = connection
        return connection

    async def close(self) -> None:
        """Close the running loop's connection (another loop's is left to that loop)."""
        connection = self._by_loop.pop(get_running_loop(), None)
        if connection is not None:
            if self._connection is connection:
                self._connection = None
            connection.abort(RedisConnectionError("the client is closed"))
