"""Who is consuming right now, and through which guard: what ``@metered`` reads.

The middleware, the Flask extension and ``with subject(...)`` set it; it lives
in a ContextVar so it follows asyncio tasks and Starlette's threadpool.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token, copy_context
from typing import TYPE_CHECKING, TypeVar, Union

from .subject import Subject

if TYPE_CHECKING:
    from .aio import AsyncUsageGuard
    from .guard import UsageGuard

AnyGuard = Union["UsageGuard", "AsyncUsageGuard"]
T = TypeVar("T")


class Budget:
    """The one ``timeout`` every call of the library within a request shares: its
    deadline (``time.monotonic()``) is set when the first call starts."""

    __slots__ = ("deadline",)

    def __init__(self) -> None:
        self.deadline: float | None = None


#: The current subject, guard and request budget (None outside a request). A plain
#: tuple: it is made on every request.
Binding = tuple["Subject | None", "AnyGuard | None", "Budget | None"]
_binding: ContextVar[Binding] = ContextVar("usage_guard_binding", default=(None, None, None))


def current_subject() -> Subject | None:
    """The org and user the current request or ``with subject(...)`` block acts for."""
    return _binding.get()[0]


def current_guard() -> AnyGuard | None:
    """The guard bound by the integration or ``with subject(..., guard=...)``."""
    return _binding.get()[1]


def current_budget() -> Budget | None:
    """The current request's :class:`Budget` (None outside a request)."""
    return _binding.get()[2]


def bind(
    who: Subject | None, guard: AnyGuard | None, budget: Budget | None = None
) -> Token[Binding]:
    """Set the current subject, guard and request budget; undo with :func:`unbind`."""
    return _binding.set((who, guard, budget))


def unbind(token: Token[Binding]) -> None:
    _binding.reset(token)


@contextmanager
def subject(org: str, user: str | None = None, guard: AnyGuard | None = None) -> Iterator[Subject]:
    """Act for ``org`` (and ``user``) inside the block, e.g. in a background job::

        with usage_guard.subject("acme", user="alice", guard=guard):
            summarize(text)        # a @metered function

    Without ``guard`` the enclosing one (if any) stays bound.
    """
    who = Subject(org, user)
    token = bind(who, guard if guard is not None else current_guard(), current_budget())
    try:
        yield who
    finally:
        unbind(token)


def stays_bound(chunks: Iterable[T]) -> BoundChunks[T]:
    """``chunks`` made with the current subject and guard bound, wherever they are iterated.

    A streamed response's body runs after the Flask and Django integrations unbound the
    request. Each step runs in a copy of the current context (what the body binds itself,
    ``with subject(...)`` across chunks, stays its own, and nothing reaches the serving
    thread), and waits for Redis within a ``timeout`` of its own: a stream may last longer.
    """
    return BoundChunks(iter(chunks))


class BoundChunks(Iterator[T]):
    """What :func:`stays_bound` returns: an iterator with ``close()``, as WSGI asks."""

    def __init__(self, iterator: Iterator[T]) -> None:
        self._iterator = iterator
        self._context = copy_context()
        self._budget = current_budget()

    def __next__(self) -> T:
        if self._budget is not None:
            self._budget.deadline = None
        return self._context.run(next, self._iterator)

    def close(self) -> None:
        """Close the body (a client gone mid-stream) in its context: its cleanup is bound."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            self._context.run(close)


def astays_bound(chunks: AsyncIterable[T]) -> AsyncIterator[T]:
    """:func:`stays_bound` for an async stream, iterated by the request's own task: the
    binding is set in that task once, and what the body binds itself stays."""
    return _abound_chunks(aiter(chunks), _binding.get())


async def _abound_chunks(iterator: AsyncIterator[T], binding: Binding) -> AsyncIterator[T]:
    _binding.set(binding)  # in the task serving this request only, which ends with it
    budget = binding[2]
    try:
        while True:
            if budget is not None:
                budget.deadline = None
            try:
                chunk = await anext(iterator)
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
