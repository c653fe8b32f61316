"""What a consumption answers, and the events it can emit."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from .errors import UsageLimitExceeded

Scope = Literal["organization", "personal", "unavailable"]


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to ``consume``/``check``/``reserve``.

    ``metric`` is the metric that denied, or for an admitted call the first one
    asked for. ``scope``, ``used``, ``limit`` and ``remaining`` describe the
    binding budget of that metric: the personal budget when it leaves less than
    the organization's limit. ``used`` is the counter after the call (``check``
    reports what ``consume`` would, and changes nothing). ``quota`` is the most
    that budget admits (the limit, or 110 % of it for soft caps) and
    ``remaining`` what is left of it; both are
    ``None`` when unlimited. ``resets_at`` is the next period's start, ``None``
    for cumulative metrics. ``scope == "unavailable"`` means Redis could not be
    asked and the guard's ``on_backend_error`` policy decided.
    """

    allowed: bool
    metric: str
    scope: Scope
    used: int
    limit: int | None
    remaining: int | None
    resets_at: datetime | None
    quota: int | None = None
    replayed: bool = False
    #: The amount this call asked of ``metric`` (0 when Redis could not be asked).
    requested: int = 0
    #: An admitted call of several metrics: the decision for each of the others.
    others: tuple[Decision, ...] = ()

    def __bool__(self) -> bool:
        return self.allowed

    def raise_for_status(self) -> Decision:
        """Raise :class:`UsageLimitExceeded` when denied; return self otherwise."""
        if not self.allowed:
            raise UsageLimitExceeded(self)
        return self


@dataclass(frozen=True, slots=True)
class ThresholdEvent:
    """An org meter reached ``threshold`` percent (80, 90 or 100) of its limit in ``period``.

    Emitted once per (org, metric, threshold, period), however many processes
    consume concurrently.
    """

    org: str
    metric: str
    threshold: int
    used: int
    limit: int
    period: str
