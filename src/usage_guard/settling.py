"""Settles and cancels that could not reach Redis, retried in the background.

A settle comes after the work ran (an LLM call, an import): failing it would
lose the work's result for a bookkeeping error. So a settle or cancel that
meets an outage is queued and retried by one background thread until it lands.
Retrying is safe because settling is idempotent: a reservation is settled or
cancelled once, whatever the number of attempts (one that timed out after
running finds nothing left to do).

The queue is bounded; what overflows it, or is still queued when the guard is
closed and Redis has not come back within the drain timeout, is counted
(``Failures.unsettled``) and logged at ERROR, never retried again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ._runtime import Failures
from .errors import BackendUnavailable

logger = logging.getLogger("usage_guard")

#: Settles waiting for Redis at most; past it they are dropped (counted, logged).
QUEUE_SIZE = 10_000
#: Seconds between attempts while Redis stays away, doubling up to the last.
FIRST_RETRY, LAST_RETRY = 0.1, 5.0


class Settler:
    """One background thread retrying queued settles in order with ``run`` (which raises
    :class:`BackendUnavailable` while Redis is away)."""

    def __init__(self, run: Callable[[Any], Any], failures: Failures) -> None:
        self._run = run
        self._failures = failures
        self._queue: deque[Any] = deque()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._draining = False

    @property
    def pending(self) -> int:
        """Settles still waiting for Redis."""
        return len(self._queue)

    def defer(self, call: Any) -> None:
        """Retry ``call`` in the background until it lands."""
        with self._changed:
            if len(self._queue) >= QUEUE_SIZE:
                self._failures.unsettled += 1
                logger.error(
                    "usage_guard: %d settles already wait for Redis; one more was dropped",
                    QUEUE_SIZE,
                )
                return
            self._queue.append(call)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._retry, name="usage_guard-settler", daemon=True
                )
                self._thread.start()
            self._changed.notify()

    def _retry(self) -> None:
        delay = FIRST_RETRY
        while True:
            with self._changed:
                if not self._queue:
                    self._thread = None  # under the lock: defer() then starts another
                    return
                call = self._queue[0]
            try:
                self._run(call)
            except BackendUnavailable:
                with self._changed:
                    self._changed.wait(FIRST_RETRY if self._draining else delay)
                delay = min(delay * 2, LAST_RETRY)
                continue
            with self._changed:
                if self._queue and self._queue[0] is call:
                    self._queue.popleft()
                self._changed.notify_all()
            delay = FIRST_RETRY

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for the queue to land; drop (count, log) the rest.

        Returns how many were dropped.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            self._draining = True
            self._changed.notify_all()
            while self._queue and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            dropped = len(self._queue)
            self._queue.clear()
            self._draining = False
            self._changed.notify_all()
        if dropped:
            self._failures.unsettled += dropped
            logger.error(
                "usage_guard: %d settles or cancels could not reach Redis before the guard "
                "closed: their reservations keep the estimate counted",
                dropped,
            )
        return dropped
