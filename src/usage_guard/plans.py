"""Plans: named sets of limits. A metric a plan leaves out (or sets to None) is unlimited."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

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
                catalog.require(metric)
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


def load_plans(path: str | os.PathLike[str]) -> tuple[dict[str, Plan], str | None]:
    """Plans and the default plan's name from a JSON file, for ``from_url(plans=...,
    default_plan=...)`` and the ``usage-guard`` command::

        {"default": "free",
         "plans": {"free": {"ai_tokens": 50000, "emails": 500},
                   "pro": {"limits": {"ai_tokens": 1000000, "api_calls": null},
                           "rate_limits": {"api_calls": "20/second"}}}}

    A plan is its limits, or an object with ``limits`` and ``rate_limits``. Anything
    else raises :class:`InvalidUsage` naming the file.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("plans", {}), dict):
            raise InvalidUsage('expected {"default": ..., "plans": {name: plan}}')
        plans = {name: _plan(name, plan) for name, plan in data.get("plans", {}).items()}
        default = data.get("default")
        if default is not None and not isinstance(default, str):
            raise InvalidUsage("'default' must be a plan name")
    except (OSError, ValueError) as error:  # InvalidUsage is a ValueError
        raise InvalidUsage(f"cannot read plans from {os.fspath(path)}: {error}") from None
    return plans, default


def _plan(name: str, plan: Any) -> Plan:
    if not isinstance(plan, dict):
        raise InvalidUsage(f"plan {name!r} must be an object")
    if "limits" in plan or "rate_limits" in plan:
        limits, rate_limits = plan.get("limits", {}), plan.get("rate_limits", {})
        if not isinstance(limits, dict) or not isinstance(rate_limits, dict):
            raise InvalidUsage(f"plan {name!r}: limits and rate_limits must be objects")
        return Plan(name, limits, rate_limits)
    return Plan(name, plan)
