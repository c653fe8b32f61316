"""The Usage page model: a typed report built from one raw read of an org's counters.

``Report.to_dict()`` is the JSON the Usage page is served as (DESIGN.md section 5).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from .catalog import Cap, Catalog
from .periods import Period, iso_utc
from .usage import Usage

Status = Literal["blue", "yellow", "orange", "red"]

#: Where each status colour starts, in percent of the limit, highest first.
STATUS_THRESHOLDS: tuple[tuple[int, Status], ...] = ((100, "red"), (90, "orange"), (80, "yellow"))


def status_of(used: int, limit: int | None) -> Status:
    """The meter colour. Integer arithmetic, so 79.999 % is still blue (as thresholds fire)."""
    if limit is None:
        return "blue"
    for threshold, colour in STATUS_THRESHOLDS:
        if 100 * used >= threshold * limit:
            return colour
    return "blue"


def percent_of(used: int, limit: int | None) -> float | None:
    """Percent of the limit, 2 decimals; None when unlimited; a limit of 0 reads as 100 %."""
    if limit is None:
        return None
    if limit == 0:
        return 100.0
    return round(used * 100 / limit, 2)


@dataclass(frozen=True, slots=True)
class MeterReport:
    """One org meter as the page shows it. ``sparkline`` is None when no history exists."""

    metric: str
    label: str
    category: str
    cap: Cap
    unit: str
    used: int
    limit: int | None
    percent: float | None
    status: Status
    resets_at: datetime | None
    sparkline: tuple[int, ...] | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "label": self.label,
            "category": self.category,
            "cap": self.cap,
            "used": self.used,
            "limit": self.limit,
            "percent": self.percent,
            "status": self.status,
            "resets_at": None if self.resets_at is None else iso_utc(self.resets_at),
            "sparkline": None if self.sparkline is None else list(self.sparkline),
        }


@dataclass(frozen=True, slots=True)
class PersonalMeterReport:
    """A user's consumption of a personal metric: against a budget, or from the shared pool."""

    metric: str
    label: str
    unit: str
    used: int
    budget: int | None
    percent: float | None
    status: Status

    @property
    def shared_pool(self) -> bool:
        return self.budget is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "used": self.used,
            "budget": self.budget,
            "shared_pool": self.shared_pool,
            "percent": self.percent,
            "status": self.status,
        }


@dataclass(frozen=True, slots=True)
class PersonalReport:
    user: str
    meters: tuple[PersonalMeterReport, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"user": self.user, "meters": [m.to_dict() for m in self.meters]}


@dataclass(frozen=True, slots=True)
class History:
    """Each metric's value per period, oldest first; ``charted`` names the ones to chart."""

    periods: tuple[Period, ...]
    series: Mapping[str, tuple[int, ...]]
    charted: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "periods": [p.key for p in self.periods],
            "series": {name: list(values) for name, values in self.series.items()},
        }


@dataclass(frozen=True, slots=True)
class Report:
    """What the Usage page shows: plan overview, org meters, "My Usage", history."""

    organization: str
    plan: str | None
    period: Period
    meters: tuple[MeterReport, ...]
    personal: PersonalReport | None
    history: History
    categories: Mapping[str, str]

    @classmethod
    def from_usage(cls, usage: Usage, catalog: Catalog) -> Report:
        meters = []
        for metric in catalog:
            raw = usage.meters[metric.name]
            meters.append(
                MeterReport(
                    metric=metric.name,
                    label=metric.label,
                    category=metric.category,
                    cap=metric.cap,
                    unit=metric.unit,
                    used=raw.used,
                    limit=raw.limit,
                    percent=percent_of(raw.used, raw.limit),
                    status=status_of(raw.used, raw.limit),
                    resets_at=usage.period.end if metric.monthly else None,
                    sparkline=raw.history if any(raw.history) else None,
                )
            )
        personal = None
        if usage.user is not None:
            personal = PersonalReport(
                usage.user,
                tuple(
                    PersonalMeterReport(
                        metric=mine.metric,
                        label=catalog[mine.metric].label,
                        unit=catalog[mine.metric].unit,
                        used=mine.used,
                        budget=mine.budget,
                        percent=percent_of(mine.used, mine.budget),
                        status=status_of(mine.used, mine.budget),
                    )
                    for mine in usage.personal.values()
                ),
            )
        history = History(
            periods=usage.periods,
            series={name: meter.history for name, meter in usage.meters.items()},
            # The help center's order: activity first (emails, AI tokens), then totals.
            charted=tuple(
                m.name for m in sorted(catalog, key=lambda m: not m.monthly) if m.charted
            ),
        )
        return cls(
            organization=usage.org,
            plan=usage.plan,
            period=usage.period,
            meters=tuple(meters),
            personal=personal,
            history=history,
            categories=catalog.categories,
        )

    def meter(self, metric: str) -> MeterReport:
        for meter in self.meters:
            if meter.metric == metric:
                return meter
        raise KeyError(metric)

    def by_category(self) -> list[tuple[str, str, list[MeterReport]]]:
        """``(category, heading, meters)`` in the catalog's category order, empty ones left out."""
        groups = [
            (category, heading, [m for m in self.meters if m.category == category])
            for category, heading in self.categories.items()
        ]
        return [group for group in groups if group[2]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "organization": self.organization,
            "plan": {
                "name": self.plan,
                "period_start": iso_utc(self.period.start),
                "period_end": iso_utc(self.period.end),
            },
            "meters": [m.to_dict() for m in self.meters],
            "personal": None if self.personal is None else self.personal.to_dict(),
            "history": self.history.to_dict(),
        }
