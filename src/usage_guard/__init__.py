"""usage_guard: meter usage and enforce SaaS plan limits and personal budgets in Redis.

Names are imported on first use (PEP 562), so ``import usage_guard`` stays light and
the Usage page (jinja2), rate limits (limits), the FastAPI and Flask integrations and
the OpenTelemetry adapter load only for applications that use them.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Imported at once: the submodule usage_guard.subject would otherwise shadow subject().
from .context import current_subject, subject

if TYPE_CHECKING:
    __version__: str

    from .aio import AsyncUsageGuard
    from .asgi import UsageGuardMiddleware
    from .catalog import DEFAULT_CATALOG, Catalog, Metric
    from .dashboard import usage_app
    from .decision import Decision, ThresholdEvent
    from .decorator import metered
    from .errors import (
        BackendMisconfigured,
        BackendUnavailable,
        CorruptedCounter,
        InvalidAmount,
        InvalidIdentifier,
        InvalidUsage,
        NotBound,
        Unidentified,
        UnknownMetric,
        UnknownPlan,
        UsageGuardError,
        UsageLimitExceeded,
    )
    from .guard import UsageGuard
    from .observe import Observer, Stats
    from .otel import OpenTelemetryObserver
    from .periods import Period
    from .plans import Plan, load_plans
    from .report import Report
    from .reservations import AsyncReservation, Reservation
    from .subject import Subject
    from .usage import MemberUsage, MeterUsage, PersonalUsage, Usage

#: Where each public name lives.
_EXPORTS = {
    "AsyncReservation": "reservations",
    "AsyncUsageGuard": "aio",
    "UsageGuardMiddleware": "asgi",
    "DEFAULT_CATALOG": "catalog",
    "Catalog": "catalog",
    "Metric": "catalog",
    "usage_app": "dashboard",
    "Decision": "decision",
    "ThresholdEvent": "decision",
    "metered": "decorator",
    "BackendMisconfigured": "errors",
    "BackendUnavailable": "errors",
    "CorruptedCounter": "errors",
    "InvalidAmount": "errors",
    "InvalidIdentifier": "errors",
    "InvalidUsage": "errors",
    "NotBound": "errors",
    "Unidentified": "errors",
    "UnknownMetric": "errors",
    "UnknownPlan": "errors",
    "UsageGuardError": "errors",
    "UsageLimitExceeded": "errors",
    "Reservation": "reservations",
    "UsageGuard": "guard",
    "Observer": "observe",
    "Stats": "observe",
    "OpenTelemetryObserver": "otel",
    "Period": "periods",
    "Plan": "plans",
    "load_plans": "plans",
    "Report": "report",
    "Subject": "subject",
    "MeterUsage": "usage",
    "PersonalUsage": "usage",
    "MemberUsage": "usage",
    "Usage": "usage",
}

__all__ = [
    "DEFAULT_CATALOG",
    "AsyncReservation",
    "AsyncUsageGuard",
    "BackendMisconfigured",
    "BackendUnavailable",
    "Catalog",
    "CorruptedCounter",
    "Decision",
    "InvalidAmount",
    "InvalidIdentifier",
    "InvalidUsage",
    "MemberUsage",
    "MeterUsage",
    "Metric",
    "NotBound",
    "Observer",
    "OpenTelemetryObserver",
    "Period",
    "PersonalUsage",
    "Plan",
    "Report",
    "Reservation",
    "Stats",
    "Subject",
    "ThresholdEvent",
    "Unidentified",
    "UnknownMetric",
    "UnknownPlan",
    "Usage",
    "UsageGuard",
    "UsageGuardError",
    "UsageGuardMiddleware",
    "UsageLimitExceeded",
    "current_subject",
    "load_plans",
    "metered",
    "subject",
    "usage_app",
]


def __getattr__(name: str) -> Any:
    if name == "__version__":  # importlib.metadata alone costs more than the rest
        from importlib.metadata import version

        return version("usage_guard")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'usage_guard' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
