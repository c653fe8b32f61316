"""The metric catalog: which metrics exist, how they reset and how they are capped.

The catalog is data. Applications extend or change it without touching library
code::

    catalog = DEFAULT_CATALOG.with_metrics(Metric("sms", "SMS sent", "monthly_activity"))
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from .errors import InvalidUsage, UnknownMetric

Cap = Literal["hard", "soft"]
Reset = Literal["monthly", "never"]

#: Category ids and the headings the Usage page shows for them, in page order.
DEFAULT_CATEGORIES: Mapping[str, str] = {
    "core_limits": "Core Limits",
    "monthly_activity": "Monthly Activity",
    "data_operations": "Data Operations",
}


@dataclass(frozen=True)
class Metric:
    """One meter.

    ``resets="monthly"`` counts per calendar month (UTC); ``"never"`` is a
    cumulative value that goes up and down. ``personal`` metrics also count per
    user and accept personal budgets; ``charted`` ones get a history chart on
    the Usage page. ``unit`` names what is counted in HTTP headers.
    """

    name: str
    label: str
    category: str
    resets: Reset = "monthly"
    cap: Cap = "hard"
    unit: str = ""
    personal: bool = False
    charted: bool = False

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-." for c in self.name):
            raise InvalidUsage(f"metric name {self.name!r}: use letters, digits and _ - .")
        if self.name == "plan":  # an org's hash holds its plan and cumulative meters
            raise InvalidUsage(
                "metric name 'plan' is reserved: an org's hash stores its plan there"
            )
        if self.resets not in ("monthly", "never"):
            raise InvalidUsage(f"metric {self.name}: resets must be 'monthly' or 'never'")
        if self.cap not in ("hard", "soft"):
            raise InvalidUsage(f"metric {self.name}: cap must be 'hard' or 'soft'")
        if self.personal and self.resets != "monthly":
            raise InvalidUsage(f"metric {self.name}: personal budgets are monthly")

    @property
    def monthly(self) -> bool:
        return self.resets == "monthly"


@dataclass(frozen=True)
class Catalog:
    """An ordered set of metrics plus the soft-cap tolerance (percent of the limit)."""

    metrics: tuple[Metric, ...]
    soft_cap_percent: int = 110
    categories: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_CATEGORIES))
    _by_name: Mapping[str, Metric] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names):
            raise InvalidUsage("catalog: metric names must be unique")
        if type(self.soft_cap_percent) is not int or not 100 <= self.soft_cap_percent <= 1000:
            raise InvalidUsage("catalog: soft_cap_percent must be an int from 100 to 1000")
        for metric in self.metrics:
            if metric.category not in self.categories:
                raise InvalidUsage(f"metric {metric.name}: unknown category {metric.category!r}")
        object.__setattr__(self, "_by_name", {m.name: m for m in self.metrics})

    def __getitem__(self, name: str) -> Metric:
        try:
            return self._by_name[name]
        except (KeyError, TypeError):
            raise UnknownMetric(f"unknown metric {name!r}") from None

    def require(self, name: str) -> Metric:
        """The metric called ``name``; raises :class:`UnknownMetric` when there is none."""
        return self[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Metric]:
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)

    def percent_admitted(self, metric: Metric) -> int:
        """How much of the limit a metric admits: 100 for hard caps, the tolerance for soft."""
        return self.soft_cap_percent if metric.cap == "soft" else 100

    def with_metrics(self, *metrics: Metric) -> Catalog:
        """A copy with these metrics added, or replacing the ones of the same name."""
        new = {m.name: m for m in metrics}
        kept = tuple(new.pop(m.name, m) for m in self.metrics)
        return replace(self, metrics=kept + tuple(new.values()))

    def without(self, *names: str) -> Catalog:
        for name in names:
            self[name]
        return replace(self, metrics=tuple(m for m in self.metrics if m.name not in names))

    def personal(self) -> Iterable[Metric]:
        return (m for m in self.metrics if m.personal)


DEFAULT_CATALOG = Catalog(
    (
        Metric("users", "Users", "core_limits", "never", "hard", "users"),
        Metric("contacts", "Contacts", "core_limits", "never", "soft", "contacts", charted=True),
        Metric("companies", "Companies", "core_limits", "never", "soft", "companies"),
        # Its unit formats its values (3.4 GB): the label needs none.
        Metric("storage", "Storage", "core_limits", "never", "hard", "bytes", charted=True),
        Metric("emails", "Emails sent", "monthly_activity", unit="emails", charted=True),
        Metric(
            "ai_tokens", "AI tokens", "monthly_activity", unit="tokens", personal=True, charted=True
        ),
        Metric("enrichments", "Enrichments", "monthly_activity", unit="enrichments", personal=True),
        Metric(
            "workflow_executions",
            "Workflow executions",
            "monthly_activity",
            cap="soft",
            unit="executions",
        ),
        Metric("import_rows", "Import rows", "data_operations", unit="rows"),
        Metric("export_rows", "Export rows", "data_operations", unit="rows"),
        Metric("lead_captures", "Lead captures", "data_operations", cap="soft", unit="captures"),
        Metric("api_calls", "API calls", "data_operations", unit="requests"),
    )
)
