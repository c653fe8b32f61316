"""Plans: named sets of limits. A metric a plan leaves out (or sets to None) is unlimited."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .catalog import Catalog
from .errors import InvalidAmount, InvalidUsage, UnknownPlan

logger = logging.getLogger("usage_guard")

#: Largest amount, limit, budget and counter value: exact in Lua's doubles.
MAX_VALUE = 2**53 - 1

#: How an unlimited override is stored in the org hash (``limit:<metric>``).
UNLIMITED = "null"


def check_value(value: object, what: str = "amount") -> int:
    if type(value) is not int or not 0 <= value <= MAX_VALUE:
        raise InvalidAmount(f"{what} must be an int from 0 to 2**53-1, not {value!r}")
    return value


def check_limit(value: object, what: str = "limit") -> int | None:
    return None if value is None else check_value(value, what)


def admitted(limit: int, percent: int) -> int:
    """The most a limit admits: ``percent`` % of it, rounded down, as the Lua scripts count."""
    return min(MAX_VALUE, limit * percent // 100)


@dataclass(frozen=True)
class Plan:
    """``Plan("free", {"ai_tokens": 50_000, "storage": None})``.

    ``rate_limits`` declares short-window limits in the ``limits`` library's
    notation, e.g. ``{"api_calls": "20/second;1000/minute"}``.
    """

    name: str
    limits: Mapping[str, int | None] = field(default_factory=dict)
    rate_limits: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidUsage("a plan needs a non-empty name")
        if "=" in self.name or not self.name.isprintable():
            # The scripts receive plans as "<name>=<limit>" lines.
            raise InvalidUsage(f"plan name {self.name!r}: no '=' or control characters")
        for metric, limit in self.limits.items():
            check_limit(limit, f"plan {self.name}: limit of {metric}")
        object.__setattr__(self, "limits", MappingProxyType(dict(self.limits)))
        object.__setattr__(self, "rate_limits", MappingProxyType(dict(self.rate_limits)))

    def limit(self, metric: str) -> int | None:
        return self.limits.get(metric)


class Plans:
    """The guard's configured plans and default plan, validated against the catalog."""

    def __init__(
        self, plans: Mapping[str, Plan] | None, default: str | None, catalog: Catalog
    ) -> None:
        self.by_name: Mapping[str, Plan] = MappingProxyType(dict(plans or {}))
        for key, plan in self.by_name.items():
            if not isinstance(plan, Plan) or plan.name != key:
                raise InvalidUsage(f"plans[{key!r}] must be a Plan named {key!r}")
            for metric in (*plan.limits, *plan.rate_limits):
                catalog[metric]
        if default is not None and default not in self.by_name:
            raise UnknownPlan(f"default plan {default!r} is not among the plans")
        self.default = default
        self.names: tuple[str, ...] = tuple(self.by_name)

    def get(self, name: str) -> Plan:
        try:
            return self.by_name[name]
        except KeyError:
            raise UnknownPlan(f"unknown plan {name!r}") from None

    def effective(self, org: str, assigned: str | None) -> Plan | None:
        """The plan an org is on: its assignment while that is configured, else the default."""
        if assigned is not None and assigned not in self.by_name:
            logger.warning(
                "org %r is assigned plan %r, which is not configured: using the default %r",
                org,
                assigned,
                self.default,
            )
            assigned = None
        name = assigned if assigned is not None else self.default
        return None if name is None else self.by_name[name]

    def resolve(self, plan: Plan | None, overrides: Mapping[str, str], metric: str) -> int | None:
        """An org's limit: its override, else its plan's, else unlimited."""
        stored = overrides.get(metric)
        if stored is not None:
            return None if stored == UNLIMITED else int(stored)
        return None if plan is None else plan.limit(metric)
