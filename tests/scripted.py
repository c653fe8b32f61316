"""A loopback server that misbehaves on cue, for client and fault tests."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

import hiredis


class ScriptedServer:
    """A loopback server that answers each command with ``reply(connection_no, command_no)``
    after ``delay(connection_no, command_no)`` seconds: a Redis that misbehaves on cue.

    ``port=0`` picks a free port; give the port of a stopped server to stand in for it.
    :meth:`close` stops listening and drops every connection, so a real server can take
    the port over at once.
    """

    def __init__(
        self,
        reply: Callable[[int, int], bytes],
        delay: Callable[[int, int], float] = lambda c, n: 0.0,
        port: int = 0,
    ) -> None:
        self.reply, self.delay = reply, delay
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = int(self.listener.getsockname()[1])
        #: Connections accepted and commands answered so far.
        self.connections = self.commands = 0
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._open.add(conn)
                number = self.connections
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        reader = hiredis.Reader()
        count = 0
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                reader.feed(data)
                while reader.gets() is not False:
                    count += 1
                    threading.Event().wait(self.delay(number, count))
                    with self._lock:
                        self.commands += 1
                    try:
                        conn.sendall(self.reply(number, count))
                    except OSError:
                        break
        with self._lock:
            self._open.discard(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            # Wakes the thread blocked in accept(): close() alone would leave the port
            # listening for as long as that call waits.
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self._lock:
            dropped = list(self._open)
        for conn in dropped:
            with contextlib.suppress(OSError):  # already closed by its thread
                conn.shutdown(socket.SHUT_RDWR)
