"""``@metered``: meter a function's calls against the guard and subject of the context.

Built on wrapt so signatures, ``inspect.iscoroutinefunction`` and method binding
survive (FastAPI's dependency injection keeps working). Async functions use the
guard's async side, sync functions its sync side, whichever kind was bound.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, cast

import wrapt

from .aio import AsyncUsageGuard
from .context import AnyGuard, current_guard, current_subject
from .errors import InvalidUsage, NotBound, Unidentified
from .plans import check_value
from .reservations import check_reservation_ttl
from .subject import Subject

P = ParamSpec("P")
R = TypeVar("R")
#: Units per call: an int, or a callable given the call's own arguments (without ``self``).
Amount = int | Callable[..., int]
#: The real units of a call, from its result (an async function's awaited result).
Cost = Callable[[Any], int]


def metered(
    metric: str,
    amount: Amount = 1,
    *,
    cost: Cost | None = None,
    ttl: float | None = None,
    guard: AnyGuard | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Count ``amount`` of ``metric`` for the current subject before each call.

    ``amount`` is an int or a callable given the call's own arguments (without
    ``self``). With ``cost=callable(result)`` the amount is reserved before the
    call and settled to ``cost(result)`` after it (an exception cancels the
    reservation), so with the default amount of 1 the call runs if one more
    unit fits and its real cost is recorded even past the cap. ``ttl`` (seconds,
    default the guard's ``reservation_ttl``) is how long that reservation may stay
    open: give it the longest the call may take. A denied call raises
    :class:`~usage_guard.UsageLimitExceeded` without running.

    The guard comes from ``guard=`` (``@guard.metered`` passes it and checks
    the metric at once) or from the context; an unknown metric fails at the
    first call otherwise.
    """
    if guard is not None:
        guard.catalog.require(metric)
    if not callable(amount):
        check_value(amount)
    if cost is not None and not callable(cost):
        raise InvalidUsage("cost must be a callable of the result")
    if ttl is not None:
        if cost is None:
            raise InvalidUsage("ttl bounds the reservation of a cost=: pass cost= with it")
        check_reservation_ttl(ttl, "ttl")

    def sync_wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        bound, who = _bound(guard)
        side = bound.sync if isinstance(bound, AsyncUsageGuard) else bound
        units = amount(*args, **kwargs) if callable(amount) else amount
        if cost is None:
            side.consume(who.org, metric, units, user=who.user).raise_for_status()
            return wrapped(*args, **kwargs)
        reservation = side.reserve(who.org, metric, units, user=who.user, ttl=ttl)
        reservation.decision.raise_for_status()
        with reservation:  # an exception cancels it
            result = wrapped(*args, **kwargs)
        try:
            actual = cost(result)
        except BaseException:
            reservation.settle(reservation.estimate)  # the work ran: the estimate stays
            raise
        reservation.settle(actual)
        return result

    async def async_wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        bound, who = _bound(guard)
        side = bound if isinstance(bound, AsyncUsageGuard) else bound.aio
        units = amount(*args, **kwargs) if callable(amount) else amount
        if cost is None:
            decision = await side.consume(who.org, metric, units, user=who.user)
            decision.raise_for_status()
            return await wrapped(*args, **kwargs)
        reservation = await side.reserve(who.org, metric, units, user=who.user, ttl=ttl)
        reservation.decision.raise_for_status()
        async with reservation:  # an exception cancels it
            result = await wrapped(*args, **kwargs)
        try:
            actual = cost(result)
        except BaseException:
            await reservation.settle(reservation.estimate)  # the work ran: the estimate stays
            raise
        await reservation.settle(actual)
        return result

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        wrapper = async_wrapper if inspect.iscoroutinefunction(func) else sync_wrapper
        return cast(Callable[P, R], wrapt.FunctionWrapper(func, wrapper))

    return decorate


def _bound(explicit: AnyGuard | None) -> tuple[AnyGuard, Subject]:
    bound = explicit if explicit is not None else current_guard()
    if bound is None:
        raise NotBound(
            "no usage guard is bound: use UsageGuardMiddleware, the Flask extension, "
            "@guard.metered(...) or `with usage_guard.subject(org, guard=guard)`"
        )
    who = current_subject()
    if who is None:
        raise Unidentified(
            "no subject is bound: the request was not identified; in scripts use "
            "`with usage_guard.subject(org, user=...)`"
        )
    return bound, who
