"""A loopback server that misbehaves on cue, for client and fault tests."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable


class ScriptedServer:
    """A loopback server that answers each command with ``reply(connection_no, command_no)``
    after ``delay(connection_no, command_no)`` seconds: a Redis that misbehaves on cue."""

    def __init__(
        self,
        reply: Callable[[int, int], bytes],
        delay: Callable[[int, int], float] = lambda c, n: 0.0,
    ) -> None:
        self.reply, self.delay = reply, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        count = 0
        with conn:
            buffer = b""
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                while b"\r\n" in buffer and _complete(buffer):
                    size = _command_size(buffer)
                    buffer = buffer[size:]
                    count += 1
                    threading.Event().wait(self.delay(number, count))
                    try:
                        conn.sendall(self.reply(number, count))
                    except OSError:
                        return

    def close(self) -> None:
        self.listener.close()


def _command_size(buffer: bytes) -> int:
    """Length of the first RESP array of bulk strings in ``buffer`` (a client command)."""
    end = buffer.index(b"\r\n")
    items, at = int(buffer[1:end]), end + 2
    for _ in range(items):
        end = buffer.index(b"\r\n", at)
        at = end + 2 + int(buffer[at + 1 : end]) + 2
    return at


def _complete(buffer: bytes) -> bool:
    try:
        return _command_size(buffer) <= len(buffer)
    except ValueError:
        return False
