"""Who is consuming right now, and through which guard: what ``@metered`` reads.

The middleware, the Flask extension and ``with subject(...)`` set it; it lives
in a ContextVar so it follows asyncio tasks and Starlette's threadpool.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Union

from .subject import Subject

if TYPE_CHECKING:
    from .aio import AsyncUsageGuard
    from .guard import UsageGuard

AnyGuard = Union["UsageGuard", "AsyncUsageGuard"]


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
