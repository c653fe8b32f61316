"""The exceptions usage_guard raises."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .decision import Decision


class UsageGuardError(Exception):
    """Base class of every usage_guard error."""


class InvalidUsage(UsageGuardError, ValueError):
    """A call named something usage_guard cannot accept; Redis was not touched."""


class UnknownMetric(InvalidUsage):
    """The metric is not in the guard's catalog."""


class UnknownPlan(InvalidUsage):
    """The plan name is not configured on the guard."""


class InvalidAmount(InvalidUsage):
    """An amount, limit or budget that is not an int in 0..2**53-1."""


class InvalidIdentifier(InvalidUsage):
    """An organization, user or idempotency id that is empty, too long or not a str."""


class NotBound(UsageGuardError, LookupError):
    """A metered call ran with no guard or no subject in its context."""


class Unidentified(NotBound):
    """A metered call ran in a request that identified no organization: integrations
    answer 401."""


class BackendUnavailable(UsageGuardError):
    """Redis could not be reached (or answered too slowly) for an operation with no fallback."""


class BackendMisconfigured(BackendUnavailable):
    """Redis refuses the guard's settings (credentials, ACL permissions, TLS verification):
    it will not answer until someone changes them."""


class CorruptedCounter(UsageGuardError):
    """A counter holds no integer (an operator's ``HSET`` typo in redis-cli, a key of
    another type): nothing was counted. ``key`` and ``field`` (None: the whole key is
    of another type) name it; fix or delete it."""

    def __init__(self, key: str, field: str | None = None) -> None:
        self.key = key
        self.field = field
        where = key if field is None else f"{key} field {field}"
        super().__init__(f"{where} holds no integer counter: nothing was counted")


class UsageLimitExceeded(UsageGuardError):
    """A consumption was denied; ``decision`` says which budget and by how much."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        super().__init__(
            f"{decision.metric}: {decision.scope} limit {decision.limit} reached "
            f"(used {decision.used})"
        )
