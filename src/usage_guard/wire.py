"""A lean Redis client for the hot path: one command, one reply, RESP2 through hiredis.

Used for ``redis://`` and ``rediss://`` URLs. redis-py spends about 30 µs of
Python per call in its pool, retry and callback layers; these clients pack the
command with ``hiredis.pack_command``, write it and parse the reply with a
``hiredis.Reader``, so a call costs the round trip and little else.

* :class:`SocketScripts` (sync) keeps a stack of idle blocking sockets, so
  threads never share one. A socket that failed or timed out is closed, never
  reused: a late reply would be read as the answer to the next call.
* :class:`~usage_guard.multiplexed.MultiplexedScripts` (asyncio, its own module)
  multiplexes every task of an event loop on one connection.

Neither retries anything (a timed-out script may have run, and a retry would
count twice). Every error reply is raised as the exception class redis-py's own
parser gives it (its table, borrowed), so one error table serves every client.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any, cast

import hiredis
from redis._parsers.base import BaseParser
from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .scripts import SHAS, SOURCES
from .servertime import LATE_REPLY, REFRESH, TIME, ServerClock

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


def new_reader() -> hiredis.Reader:
    # Error replies become the exception redis-py's own parser makes of them
    # (``-OOM`` an OutOfMemoryError, ``-LOADING`` a BusyLoadingError, ...), as values.
    return hiredis.Reader(replyError=BaseParser.parse_error, encoding="utf-8")


class _Socket:
    """One blocking connection; after any error it is unusable and the caller closes it."""

    def __init__(self, endpoint: Endpoint, wait: float | None = None) -> None:
        try:
            timeout = endpoint.timeout if wait is None else wait
            sock = socket.create_connection((endpoint.host, endpoint.port), timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if endpoint.tls is not None:
                sock = endpoint.tls.wrap_socket(sock, server_hostname=endpoint.host)
        except TimeoutError as error:
            raise RedisTimeoutError(f"connecting to Redis at {endpoint} timed out") from error
        except OSError as error:
            raise RedisConnectionError(f"cannot connect to Redis at {endpoint}: {error}") from error
        self.sock = sock
        self.reader = new_reader()
        try:
            for command in endpoint.handshake:
                checked(self.call(command))
        except BaseException:
            self.close()
            raise

    def read_clock(self) -> ServerClock:
        reply = checked(self.call(TIME))
        return ServerClock.reading(reply, time.monotonic())

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
        #: The server's clock (see :mod:`usage_guard.servertime`), read before the first
        #: consumption and again after any failure: the next socket may reach another
        #: server (a restart, a failover behind the same address).
        self._clock: ServerClock | None = None

    def run(
        self,
        script: str,
        keys: list[str],
        args: list[str | int],
        wait: float | None = None,
        deadline_arg: int | None = None,
    ) -> Any:
        return self._exchange(None, script, keys, args, wait, deadline_arg)

    def command(self, *args: str | int) -> Any:
        """Any other command, e.g. ``command("HGET", key, field)``."""
        return self._exchange(pack(*args))

    def _exchange(
        self,
        command: bytes | None,
        script: str | None = None,
        keys: list[str] | None = None,
        args: list[str | int] | None = None,
        wait: float | None = None,
        deadline_arg: int | None = None,
    ) -> Any:
        """Send ``command`` (else an EVALSHA of ``script``) on an idle socket (a new one
        if none); a script the server does not know yet (NOSCRIPT) is sent once more,
        whole. ``wait`` bounds this exchange as a whole, connecting included, when
        shorter than the timeout; ``args[deadline_arg]`` gets the moment it gives up,
        by the server's clock."""
        if self._pid != os.getpid():
            # A forked child must not talk on its parent's sockets.
            self._idle, self._pid = [], os.getpid()
        deadline = None if wait is None else time.monotonic() + wait
        connection = self._idle.pop() if self._idle else _Socket(self.endpoint, wait)
        try:
            if deadline is not None:
                connection.sock.settimeout(max(0.001, deadline - time.monotonic()))
            if command is None:
                assert script is not None and keys is not None and args is not None
                if deadline_arg is not None:
                    # Each read waits the socket's timeout, counted from after this point.
                    clock, now = self._clock, time.monotonic()
                    if clock is None or now - clock.read_at > REFRESH:
                        clock = self._clock = connection.read_clock()
                        now = time.monotonic()
                        if deadline is not None:  # the reading took some of the wait
                            connection.sock.settimeout(max(0.001, deadline - now))
                    gives_up = now + self.endpoint.timeout if deadline is None else deadline
                    args[deadline_arg] = clock.deadline(gives_up)
                # hiredis' stub types the tuple as one element.
                command = hiredis.pack_command(("EVALSHA", SHAS[script], len(keys), *keys, *args))  # type: ignore[arg-type]
            reply = connection.call(command)
            if script is not None and isinstance(reply, NoScriptError):
                if deadline is not None:
                    connection.sock.settimeout(max(0.001, deadline - time.monotonic()))
                reply = connection.call(eval_source(script, keys or [], args or []))
            if deadline is not None:
                connection.sock.settimeout(self.endpoint.timeout)
            if deadline_arg is not None and reply == LATE_REPLY:
                self._clock = None  # the deadline came early: the reading was slow
        except BaseException:
            connection.close()
            # The idle sockets lead to the same server: after a restart they are all
            # dead, and a probe (one call per breaker interval) must not find them one
            # by one.
            self.close()
            self._clock = None
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
