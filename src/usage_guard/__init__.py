"""usage_guard: meter usage and enforce SaaS plan limits and personal budgets in Redis."""

from .aio import AsyncReservation, AsyncUsageGuard
from .asgi import UsageGuardMiddleware
from .catalog import DEFAULT_CATALOG, Catalog, Metric
from .context import current_subject, subject
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
from .guard import Reservation, UsageGuard
from .periods import Period
from .plans import Plan
from .report import Report
from .subject import Subject
from .usage import MeterUsage, PersonalUsage, Usage

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
    "MeterUsage",
    "Metric",
    "NotBound",
    "Period",
    "PersonalUsage",
    "Plan",
    "Report",
    "Reservation",
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
    "metered",
    "subject",
    "usage_app",
]
