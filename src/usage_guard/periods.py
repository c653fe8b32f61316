"""Billing periods: calendar months in UTC. Pure functions; the clock is injected."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True, order=True)
class Period:
    """One calendar month in UTC; ``key`` (``YYYY-MM``) is how Redis keys name it."""

    year: int
    month: int

    @classmethod
    def containing(cls, moment: datetime) -> Period:
        if moment.tzinfo is None:
            raise ValueError("the clock must return timezone-aware datetimes")
        moment = moment.astimezone(timezone.utc)
        return cls(moment.year, moment.month)

    @classmethod
    def parse(cls, key: str) -> Period:
        year, month = key.split("-")
        return cls(int(year), int(month))

    @cached_property
    def key(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    @cached_property
    def start(self) -> datetime:
        return datetime(self.year, self.month, 1, tzinfo=timezone.utc)

    # Cached: every decision of a period carries it as ``resets_at``.
    @cached_property
    def end(self) -> datetime:
        """The next period's start: when this period's counters reset."""
        return self.shift(1).start

    @property
    def seconds(self) -> int:
        return int((self.end - self.start).total_seconds())

    def shift(self, months: int) -> Period:
        index = self.year * 12 + self.month - 1 + months
        return Period(index // 12, index % 12 + 1)

    def window(self, months: int) -> tuple[Period, ...]:
        """The ``months`` periods ending with this one, oldest first."""
        return tuple(self.shift(offset) for offset in range(1 - months, 1))


def iso_utc(moment: datetime) -> str:
    """``2026-12-01T00:00:00Z``: the form the JSON and HTTP surfaces use."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
