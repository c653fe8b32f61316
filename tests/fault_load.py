"""A small load harness for fault-injection tests: workers call one operation in a loop
until stopped, and every call is recorded (start, latency, outcome).

- :class:`ThreadLoad`: N threads calling a sync ``request(op) -> outcome``.
- :class:`AsyncLoad`: N asyncio tasks on an event loop of their own (in a background
  thread, so the test thread stays free to inject faults) calling an async
  ``request(op) -> outcome`` that a session yields; :func:`asgi_client` opens an httpx
  client on an ASGI app in-process for such a session.

Both are context managers: the load runs inside the ``with`` block. ``op`` names what
a call does (``choose(worker, n)`` picks it; the part before an ``@`` is its kind, the
rest is free, e.g. ``"send@org3"``); ``outcome`` is whatever the request returns (an
HTTP status, a decision kind), or the class name of the exception it raised.
:class:`Load` then answers the questions a fault test asks: the worst latency, the
counts by outcome, the recovery time after a moment. Times are ``time.monotonic()``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

#: How long stopping may wait for the calls in flight before the harness gives up.
STOP_WAIT = 10.0


@dataclass(frozen=True, slots=True)
class Call:
    """One finished call."""

    worker: int
    op: str
    #: ``time.monotonic()`` when the call began.
    start: float
    #: Seconds it took.
    latency: float
    outcome: str

    @property
    def end(self) -> float:
        return self.start + self.latency

    @property
    def kind(self) -> str:
        """The op up to its first ``@``: ``"send"`` for ``"send@org3"``."""
        return self.op.partition("@")[0]


#: ``choose(worker, n)``: the op of a worker's ``n``-th call (both count from 0).
Choose = Callable[[int, int], str]
SyncRequest = Callable[[str], str]
AsyncRequest = Callable[[str], Awaitable[str]]
#: Entered on the load's event loop; yields the request and cleans up on exit.
AsyncSession = Callable[[], AbstractAsyncContextManager[AsyncRequest]]


def always(op: str) -> Choose:
    """Every call does ``op``."""
    return lambda worker, n: op


def cycle(ops: Sequence[str]) -> Choose:
    """Worker ``w``'s ``n``-th call does ``ops[(w + n) % len(ops)]``: a steady mix."""
    return lambda worker, n: ops[(worker + n) % len(ops)]


class Load:
    """What both loads share: the running flag, the records and their analysis."""

    def __init__(self, workers: int, choose: Choose | None) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.workers = workers
        #: The op of each call; every call is ``"call"`` unless given.
        self.choose = choose or always("call")
        #: Every finished call, in the order they finished.
        self.calls: list[Call] = []
        self.started_at = 0.0
        self.stopped_at = 0.0
        self._running = False

    # -- running ------------------------------------------------------------------------

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Load:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _record(self, worker: int, op: str, start: float, outcome: str) -> None:
        self.calls.append(Call(worker, op, start, time.monotonic() - start, outcome))

    # -- analysis -----------------------------------------------------------------------

    def between(self, start: float | None = None, end: float | None = None) -> list[Call]:
        """The calls that began in ``[start, end)`` (either bound may be left open)."""
        return [
            c
            for c in self.calls
            if (start is None or c.start >= start) and (end is None or c.start < end)
        ]

    def worst(self, calls: Iterable[Call] | None = None) -> Call | None:
        """The slowest call (of ``calls``, all by default)."""
        return max(self.calls if calls is None else calls, key=lambda c: c.latency, default=None)

    def worst_latency(self, calls: Iterable[Call] | None = None) -> float:
        slowest = self.worst(calls)
        return 0.0 if slowest is None else slowest.latency

    def counts(
        self,
        calls: Iterable[Call] | None = None,
        key: Callable[[Call], str] = lambda c: f"{c.kind} {c.outcome}",
    ) -> Counter[str]:
        """How many calls per ``key`` (by default ``"<kind> <outcome>"``)."""
        return Counter(key(c) for c in (self.calls if calls is None else calls))

    def rate(self) -> float:
        """Calls per second over the run."""
        elapsed = (self.stopped_at or time.monotonic()) - self.started_at
        return len(self.calls) / elapsed if elapsed > 0 else 0.0

    def recovery_after(self, moment: float, ok: Callable[[Call], bool]) -> float | None:
        """Seconds from ``moment`` until the first call begun since then that is ``ok``
        and after which every call begun is ``ok`` has finished; ``None`` if that never
        happened (no ok call begun after the last failing one)."""
        since = sorted(self.between(moment), key=lambda c: c.start)
        last_bad = max((i for i, c in enumerate(since) if not ok(c)), default=-1)
        later = since[last_bad + 1 :]
        if not later:
            return None
        return min(c.end for c in later) - moment


class ThreadLoad(Load):
    """``workers`` threads, each calling ``request(op)`` back to back until stopped."""

    def __init__(
        self, request: SyncRequest, *, workers: int = 8, choose: Choose | None = None
    ) -> None:
        super().__init__(workers, choose)
        self.request = request
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._running = True
        self.started_at = time.monotonic()
        self._threads = [
            threading.Thread(target=self._work, args=(i,), name=f"load-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self, worker: int) -> None:
        n = 0
        while self._running:
            op = self.choose(worker, n)
            n += 1
            start = time.monotonic()
            try:
                outcome = self.request(op)
            except Exception as error:
                outcome = type(error).__name__
            self._record(worker, op, start, outcome)

    def stop(self) -> None:
        self._running = False
        deadline = time.monotonic() + STOP_WAIT
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.stopped_at = time.monotonic()
        if any(thread.is_alive() for thread in self._threads):
            raise RuntimeError(f"load threads still running {STOP_WAIT} s after stop()")


class AsyncLoad(Load):
    """``workers`` tasks on an event loop of their own, each awaiting ``request(op)`` back
    to back until stopped; ``session()`` is entered on that loop first and exited last
    (close what belongs to the loop there, e.g. ``await guard.aio.aclose()``)."""

    def __init__(
        self, session: AsyncSession, *, workers: int = 16, choose: Choose | None = None
    ) -> None:
        super().__init__(workers, choose)
        self.session = session
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        #: What went wrong in the harness itself (the session's set-up or clean-up).
        self._failure: BaseException | None = None

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._main, name="load-loop", daemon=True)
        self._thread.start()
        if not self._ready.wait(STOP_WAIT):
            self._running = False
            raise RuntimeError("the load's event loop did not start")
        if self._failure is not None:
            self.stop()

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as error:
            self._failure = error
        finally:
            self._ready.set()

    async def _run(self) -> None:
        async with self.session() as request:
            self.started_at = time.monotonic()
            self._ready.set()
            await asyncio.gather(*(self._work(i, request) for i in range(self.workers)))

    async def _work(self, worker: int, request: AsyncRequest) -> None:
        n = 0
        while self._running:
            op = self.choose(worker, n)
            n += 1
            start = time.monotonic()
            try:
                outcome = await request(op)
            except Exception as error:
                outcome = type(error).__name__
            self._record(worker, op, start, outcome)
            await asyncio.sleep(0)  # a call that failed without waiting lets the others run

    def stop(self) -> None:
        self._running = False
        if self._thread is not None:
            self._thread.join(STOP_WAIT)
            if self._thread.is_alive():
                raise RuntimeError(
                    f"the load's event loop still running {STOP_WAIT} s after stop()"
                )
        self.stopped_at = time.monotonic()
        if self._failure is not None:
            raise RuntimeError("the load harness failed") from self._failure


@asynccontextmanager
async def asgi_client(
    app: Any, *, close: Iterable[Callable[[], Awaitable[None]]] = ()
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client calling ``app`` in-process; ``close`` coroutines run after it.

    An exception escaping the app is raised from the request (a server would answer 500).
    """
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client
    finally:
        for closer in close:
            await closer()
