"""Threshold events delivered to every listener, off the request path.

A threshold crossing is recorded exactly once in Redis (the script that crosses
it says so once, whichever process ran it). In-process, each event is then
delivered at most once to every registered listener, sync or async, whichever
side (sync or async code) caused it: by one background thread, so no request
waits for a listener. Async listeners run there too, each on an event loop of
its own (``asyncio.run``): they must not use objects bound to the app's loop.

At most :data:`QUEUE_SIZE` events wait at once; what does not fit is dropped,
counted (``Failures.dropped_events``) and logged. ``close()`` / ``aclose()``
wait for the queue up to their timeout; what is left is still delivered
afterwards, the interpreter's exit included.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .decision import ThresholdEvent
from .failures import Failures

logger = logging.getLogger("usage_guard")

Listener = Callable[[ThresholdEvent], Any]

#: Events waiting for their listeners at most; past it they are dropped (counted, logged).
QUEUE_SIZE = 10_000


class Dispatcher:
    """Hands events to ``listeners`` (the guard's list, shared by its async twin)."""

    def __init__(
        self,
        listeners: list[Listener],
        failures: Failures,
        on_dropped: Callable[[int], None] | None = None,
    ) -> None:
        self.listeners = listeners
        self._failures = failures
        #: Told how many events were dropped (the runtime's observers).
        self._on_dropped = on_dropped
        self._pending = 0
        self._changed = threading.Condition()
        self._executor: ThreadPoolExecutor | None = None
        _dispatchers.add(self)

    @property
    def pending(self) -> int:
        """Events not yet delivered to every listener."""
        return self._pending

    def publish(self, events: Sequence[ThresholdEvent]) -> None:
        """Queue ``events`` for every listener; return at once."""
        if not self.listeners:
            return
        with self._changed:
            if self._pending + len(events) > QUEUE_SIZE:
                self._failures.dropped_events += len(events)
                logger.error(
                    "usage_guard: %d threshold events already wait for their listeners; "
                    "%d more were dropped",
                    self._pending,
                    len(events),
                )
                if self._on_dropped is not None:
                    self._on_dropped(len(events))
                return
            self._pending += len(events)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="usage_guard-events")
            executor = self._executor
        for event in events:
            executor.submit(self._deliver, event)

    def _deliver(self, event: ThresholdEvent) -> None:
        try:
            for listener in list(self.listeners):
                try:
                    outcome = listener(event)
                    if inspect.isawaitable(outcome):
                        asyncio.run(_awaited(outcome))
                except Exception:
                    logger.exception("usage_guard: threshold listener %r failed", listener)
        finally:
            with self._changed:
                self._pending -= 1
                self._changed.notify_all()

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for the queue to be delivered; return how many
        events are still waiting (they are delivered later)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._pending and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            return self._pending

    def _forget_in_child(self) -> None:
        """After fork: the parent delivers what it queued; the child starts empty, with a
        thread of its own (its parent's does not exist in it)."""
        self._pending = 0
        self._executor = None
        self._changed = threading.Condition()


async def _awaited(outcome: Awaitable[Any]) -> Any:
    return await outcome


_dispatchers: weakref.WeakSet[Dispatcher] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for dispatcher in list(_dispatchers):
        dispatcher._forget_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
