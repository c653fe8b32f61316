"""A raw read of an organization's counters: what the Usage page is built from."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .periods import Period


@dataclass(frozen=True, slots=True)
class MeterUsage:
    """An org meter now, with its value in each period of the history window (oldest first).

    Monthly metrics show each period's total; cumulative ones the period's last
    value, carried forward over periods without changes.
    """

    metric: str
    used: int
    limit: int | None
    quota: int | None
    history: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PersonalUsage:
    """One user's consumption of a personal metric this period; ``budget`` None = shared pool."""

    metric: str
    used: int
    budget: int | None


@dataclass(frozen=True, slots=True)
class Usage:
    org: str
    user: str | None
    plan: str | None
    period: Period
    periods: tuple[Period, ...]
    meters: Mapping[str, MeterUsage]
    personal: Mapping[str, PersonalUsage]


@dataclass(frozen=True, slots=True)
class MemberUsage:
    """One member's consumption of a personal metric this period; ``budget`` None = the
    shared pool."""

    user: str
    used: int
    budget: int | None
