"""Settles and cancels that could not reach Redis, retried in the background.

A settle comes after the work ran (an LLM call, an import): failing it would
lose the work's result for a bookkeeping error. So a settle or cancel that
meets an outage is queued and retried by one background thread until it lands.
Retrying is safe because settling is idempotent: a reservation is settled or
cancelled once, whatever the number of attempts (one that timed out after
running finds nothing left to do).

The queue is bounded; what overflows it, or is still queued when the guard is
closed (or the process exits) and Redis has not come back within the drain
timeout, is counted (``Failures.unsettled``) and logged at ERROR, never retried
again. So is a settle that fails for anything but an outage (a bug, a data
error): retrying would fail the same way. A forked child starts with an empty
queue (its parent retries what it had queued).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from .errors import BackendUnavailable, CorruptedCounter
from .failures import Failures
from .faults import Fault, classify

logger = logging.getLogger("usage_guard")

#: Settles waiting for Redis at most; past it they are dropped (counted, logged).
QUEUE_SIZE = 10_000
#: Seconds between attempts while Redis stays away, doubling up to the last.
FIRST_RETRY, LAST_RETRY = 0.1, 5.0
#: Seconds the process's exit waits for settles still queued.
EXIT_TIMEOUT = 5.0


class Settler:
    """One background thread retrying queued settles with ``run`` (which raises
    :class:`BackendUnavailable` while Redis is away)."""

    def __init__(self, run: Callable[[Any], Any], failures: Failures) -> None:
        self._run = run
        self._failures = failures
        self._queue: deque[Any] = deque()
        self._running: Any = None
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._draining = self._stopping = False
        _settlers.add(self)

    @property
    def pending(self) -> int:
        """Settles still waiting for Redis."""
        return len(self._queue) + (self._running is not None)

    def defer(self, call: Any) -> None:
        """Retry ``call`` in the background until it lands."""
        with self._changed:
            if self.pending >= QUEUE_SIZE:
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
            self._changed.notify_all()

    def failed(self, call: Any, failure: Exception) -> bool:
        """A settle that failed on its first try: retried in the background when it may
        land later (True: it will), else given up (False): it would fail the same way."""
        if _may_land_later(failure):
            self.defer(call)
            return True
        self._give_up(failure)
        return False

    def _give_up(self, failure: Exception) -> None:
        self._failures.unsettled += 1
        if isinstance(failure, CorruptedCounter):  # anything else was logged with its traceback
            logger.error("usage_guard: a settle or cancel was given up: %s", failure)

    def _retry(self) -> None:
        delay = FIRST_RETRY
        while True:
            with self._changed:
                if not self._queue or self._stopping:
                    self._thread = None  # under the lock: defer() then starts another
                    self._changed.notify_all()
                    return
                call = self._running = self._queue.popleft()
            try:
                self._run(call)
                landed, hopeless = True, False
            except Exception as error:
                landed, hopeless = False, not _may_land_later(error)
                if hopeless:
                    self._give_up(error)
            with self._changed:
                self._running = None
                if not (landed or hopeless):
                    # To the back: on a Cluster one node's outage holds up no other node's.
                    self._queue.append(call)
                self._changed.notify_all()
                if landed:
                    delay = FIRST_RETRY
                else:
                    self._changed.wait(FIRST_RETRY if self._draining else delay)
                    delay = min(delay * 2, LAST_RETRY)

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for the queue to land, stop retrying, and drop
        (count, log) what is left. Returns how many were dropped."""
        deadline = time.monotonic() + timeout
        with self._changed:
            self._draining = True
            self._changed.notify_all()
            while self.pending and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            self._stopping = True
            self._changed.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()  # an attempt in flight ends within the guard's timeout
        with self._changed:
            dropped = len(self._queue)
            self._queue.clear()
            self._draining = self._stopping = False
        if dropped:
            self._failures.unsettled += dropped
            logger.error(
                "usage_guard: %d settles or cancels could not reach Redis before the guard "
                "closed: their reservations keep the estimate counted",
                dropped,
            )
        return dropped

    def _forget_in_child(self) -> None:
        """After fork: the parent retries what it queued; the child starts empty."""
        self._queue.clear()
        self._running = self._thread = None
        self._changed = threading.Condition()


def _may_land_later(error: Exception) -> bool:
    """Whether a failed settle may land later (an outage or a misconfiguration that
    someone may fix), rather than fail the same way every time (a bug, a data error)."""
    cause = error.__cause__ if isinstance(error, BackendUnavailable) else error
    return cause is not None and classify(cause) in (Fault.OUTAGE, Fault.MISCONFIGURED)


_settlers: weakref.WeakSet[Settler] = weakref.WeakSet()


@atexit.register
def _drain_at_exit() -> None:
    # Integrations do not close their guard at shutdown; the process exit does.
    for settler in list(_settlers):
        if settler.pending:
            settler.drain(EXIT_TIMEOUT)


def _after_fork_in_child() -> None:
    for settler in list(_settlers):
        settler._forget_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
