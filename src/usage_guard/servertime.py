"""Redis's clock as a client sees it: when, by Redis's ``TIME``, a caller gives up.

A consumption whose caller has given up (its reply came too late: the server hung,
or a call ahead of it on the connection did) may still run when Redis resumes.
Each one therefore carries the moment its caller gives up on it, in Redis's clock,
and ``lua/consume.lua`` compares it with ``TIME``: a call that runs later does what
its caller was told (the outage policy's answer) instead of deciding anew.

**The invariant.** The deadline sent is never later, by Redis's clock, than the
moment the client gives up on that call. So a script that runs after the client
gave up always finds itself late; one that finds itself late while its caller still
waits (the deadline errs early by up to a round trip) answers late too, and the caller
reads that as the policy's answer: either way the caller's answer and Redis agree.

It holds because:

* a reading of ``TIME`` that came back by ``received`` (``time.monotonic()``) was
  taken by Redis at or before ``received``, so ``TIME - received`` is at most the true
  offset between the two clocks;
* clocks drift apart by at most :data:`DRIFT` of the time since the reading, which
  is taken again after :data:`REFRESH` seconds and after any failure (a reconnect, a
  failover), per server (a Cluster node, a multiplexed connection);
* ``gives_up`` is never later than the moment the client actually gives up: callers
  pass when their timer is due, computed before the command is sent, in
  ``time.monotonic()`` or an event loop's ``loop.time()`` (asyncio's is
  ``time.monotonic()``; uvloop's is the same clock, read at the start of the loop's
  iteration, so it only lags);
* milliseconds are rounded down here and in the script, and one more is taken off:
  uvloop rounds a timer's delay to the nearest millisecond, so its timers may fire up
  to half a millisecond early.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Seconds after which a connection reads ``TIME`` again before its next consumption.
REFRESH = 60.0
#: How fast two clocks may drift apart between readings (200 ppm: twice what a quartz
#: clock nobody corrects drifts); a deadline is moved earlier by that much per second.
DRIFT = 2e-4
#: The packed ``TIME`` command.
TIME = b"*1\r\n$4\r\nTIME\r\n"
#: What ``consume.lua`` answers a call that ran after its deadline. One that comes back
#: to a caller still waiting means the reading erred too far (its round trip was slow):
#: the client forgets it and reads the clock again.
LATE_REPLY = [3]


@dataclass(frozen=True, slots=True)
class ServerClock:
    """One reading of a server's ``TIME``, to carry moments over to that server's clock."""

    #: Redis's time minus ``time.monotonic()`` (seconds), never more than the true offset.
    offset: float
    #: ``time.monotonic()`` when the reading came back.
    read_at: float

    @classmethod
    def reading(cls, reply: Any, received: float) -> ServerClock:
        """The clock that ``reply`` (``TIME``'s: seconds and microseconds, as strings or
        ints) received at ``received`` (``time.monotonic()``) implies."""
        seconds, micros = reply
        return cls(int(seconds) + int(micros) / 1e6 - received, received)

    def deadline(self, gives_up: float) -> int:
        """``gives_up`` (``time.monotonic()``) in ms by the server's clock, rounded down and
        moved earlier by the drift that can have built up since the reading."""
        # Drift counts both ways from the reading; the moment is positive: int() rounds down.
        return int((gives_up + self.offset - abs(gives_up - self.read_at) * DRIFT) * 1000) - 1

    def stale(self, now: float) -> bool:
        return now - self.read_at > REFRESH
