"""Reservations: an estimate held now, settled or cancelled later (sync and async)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from .decision import Decision
from .errors import InvalidUsage
from .periods import Period

if TYPE_CHECKING:
    from .aio import AsyncUsageGuard
    from .calls import Amounts, Call
    from .clock import GuardClock
    from .guard import UsageGuard

logger = logging.getLogger("usage_guard")

#: The longest a reservation may stay open (seconds): it holds work in progress.
MAX_RESERVATION_TTL = 31 * 86400


def check_reservation_ttl(ttl: object, name: str) -> float:
    """How long a reservation holds its estimate (seconds), validated."""
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise InvalidUsage(f"{name} must be a number of seconds, not {type(ttl).__name__}")
    if not 0 < ttl <= MAX_RESERVATION_TTL:  # NaN included
        raise InvalidUsage(f"{name} must be above 0 and at most 31 days ({ttl!r} seconds)")
    return float(ttl)


@dataclass(frozen=True, slots=True)
class Ticket:
    """What settling or cancelling a reservation needs to find it again."""

    id: str
    org: str
    user: str | None
    period: Period
    amounts: Amounts
    #: When the estimate stops being held (ms since the epoch, by the guard's clock).
    deadline: int


class ReservationBase:
    """What the sync and async reservations share: the decision and where to find it again."""

    def __init__(self, decision: Decision, ticket: Ticket, clock: GuardClock) -> None:
        self.decision = decision
        self.ticket = ticket
        self._clock = clock
        #: Settled or cancelled (or handed to the background settler) by this object.
        self.closed = False

    @property
    def _held(self) -> bool:
        """Whether Redis may still hold the estimate for this object to settle or cancel."""
        return self.decision.allowed and self.decision.scope != "unavailable" and not self.closed

    @property
    def open(self) -> bool:
        """Whether the estimate is held: neither settled, cancelled nor expired yet."""
        return self._held and self._clock.now()[2] < self.ticket.deadline

    @property
    def expires_at(self) -> datetime:
        """When an estimate left open is refunded (by the guard's clock)."""
        return datetime.fromtimestamp(self.ticket.deadline / 1000, timezone.utc)

    def _closing(self, call: Call[bool]) -> Call[bool] | None:
        """``call`` (a settle or cancel) if it is this reservation's to send, now closed;
        None when there is nothing left to adjust. Expired reservations still send it:
        Redis decides what a late settle or cancel does."""
        if not self._held:
            return None
        self.closed = True
        return call

    @property
    def estimate(self) -> Amounts:
        """What was reserved, per metric: settling to it closes the reservation as counted."""
        return self.ticket.amounts


def cancel_failed(error: Exception) -> None:
    """A cancel that failed while another exception was on its way: logged, never raised
    in its place (the caller re-raises the original)."""
    logger.error(
        "usage_guard: could not cancel a reservation (%s: %s)", type(error).__name__, error
    )


class Reservation(ReservationBase):
    """An estimate held by :meth:`UsageGuard.reserve` until its deadline
    (``expires_at``). Settle or cancel it once.

    A denied reservation (``not r.decision.allowed``) counted nothing: its
    ``settle`` and ``cancel`` do nothing.
    """

    def __init__(self, guard: UsageGuard, decision: Decision, ticket: Ticket) -> None:
        super().__init__(decision, ticket, guard.calls.time)
        self.guard = guard

    def settle(self, actual: int | Amounts) -> bool:
        """Count ``actual`` instead of the estimate (never denied), in the month the
        estimate was reserved in; after the deadline, counted once as a plain
        consumption. False if already settled or cancelled.

        Never fails for an outage: the settle is then retried in the background
        until Redis answers (and True is returned).
        """
        call = self._closing(self.guard.calls.settle(self.ticket, actual))
        return call is not None and self.guard._settle(call)

    def cancel(self) -> bool:
        """Drop the estimate. False if already settled or cancelled, or expired (it was
        refunded then); retried like settle."""
        call = self._closing(self.guard.calls.settle(self.ticket, None))
        return call is not None and self.guard._settle(call)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        """An exception in the block cancels the reservation; a failed cancel never hides it."""
        if error is not None:
            try:
                self.cancel()
            except Exception as failed:
                cancel_failed(failed)


class AsyncReservation(ReservationBase):
    """The asyncio form of :class:`~usage_guard.guard.Reservation`."""

    def __init__(self, guard: AsyncUsageGuard, decision: Decision, ticket: Ticket) -> None:
        super().__init__(decision, ticket, guard.calls.time)
        self.guard = guard

    async def settle(self, actual: int | Amounts) -> bool:
        """The async :meth:`Reservation.settle`: ``actual`` instead of the estimate;
        retried in the background during an outage. False if already done."""
        call = self._closing(self.guard.calls.settle(self.ticket, actual))
        return call is not None and await self.guard._settle(call)

    async def cancel(self) -> bool:
        """Refund the estimate; retried like settle. False if already done."""
        call = self._closing(self.guard.calls.settle(self.ticket, None))
        return call is not None and await self.guard._settle(call)

    async def __aenter__(self) -> AsyncReservation:
        return self

    async def __aexit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        """An exception in the block cancels the reservation; a failed cancel never hides it."""
        if error is not None:
            try:
                await self.cancel()
            except Exception as failed:
                cancel_failed(failed)
