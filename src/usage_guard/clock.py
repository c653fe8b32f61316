"""The guard's clock: one reading gives the period, its keys' TTL and the scripts' time."""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone

from .periods import Clock, Period, utc_now


class GuardClock:
    """Now by the guard's clock (``clock=`` of ``from_url``, the real one by default),
    in the forms the calls need; the current period is cached until it ends."""

    def __init__(self, clock: Clock, history_months: int) -> None:
        self.clock = clock
        self.history_months = history_months
        self._period_cache: tuple[Period, float, float, float] | None = None

    def timestamp(self) -> float:
        """Now by the guard's clock, in seconds since the epoch."""
        return time.time() if self.clock is utc_now else self.clock().timestamp()

    def now(self) -> tuple[Period, int, int]:
        """The current period, the TTL (s) of its keys (until it leaves the history
        window) and the time (ms since the epoch) that scripts sweep reservations by.

        The clock is read once, so the period and the TTL never straddle 00:00Z on the 1st.
        """
        moment = None if self.clock is utc_now else self.clock()
        now = time.time() if moment is None else moment.timestamp()
        cached = self._period_cache
        if cached is None or not cached[1] <= now < cached[2]:
            period = Period.containing(moment or datetime.fromtimestamp(now, timezone.utc))
            expires = period.shift(self.history_months).start.timestamp()
            cached = (period, period.start.timestamp(), period.end.timestamp(), expires)
            self._period_cache = cached
        return cached[0], max(1, math.ceil(cached[3] - now)), int(now * 1000)

    def ttl(self, period: Period) -> int:
        expires = period.shift(self.history_months).start.timestamp()
        return max(1, math.ceil(expires - self.timestamp()))
