"""What a guard remembers of its storage's failures: counts, and logs paced by time.

A Cluster failover interleaves failures with successes (orgs on healthy nodes
keep answering), so "log once per outage" turned into hundreds of lines a
second. Logs are paced by time instead: one ERROR a minute at most while calls
fail (with how many failed since the last one), one WARNING when calls succeed
again after a logged failure.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import ClassVar

from .faults import Fault, classify

logger = logging.getLogger("usage_guard")

#: Seconds between two ERROR lines about the same kind of failure.
LOG_INTERVAL = 60.0


class Failures:
    """The failures of one guard's storage calls (shared by a guard and its async twin).

    ``backend_errors`` counts outages and misconfigurations, which the
    ``on_backend_error`` policy answers; ``unexpected_errors`` counts anything
    else (a bug, a script error), which the policy answers too but which is
    logged with its traceback; ``unsettled`` counts settles and cancels given up
    on (see :mod:`usage_guard.settling`), ``dropped_events`` threshold events the
    listeners' queue could not take (see :mod:`usage_guard.listeners`).
    """

    #: The test suite sets it: there an unexpected error fails the test instead.
    reraise_unexpected: ClassVar[bool] = False

    def __init__(self) -> None:
        self.backend_errors = 0
        self.unexpected_errors = 0
        self.unsettled = 0
        self.dropped_events = 0
        self._by_class: dict[str, int] = {}
        #: Whether calls fail: set by every outage or misconfiguration, cleared by a
        #: success that started after the last one.
        self.failing = False
        self._lock = threading.Lock()
        self._logged_at: dict[Fault, float] = {}
        self._unlogged: dict[Fault, int] = {}
        self._recovery_logged_at = -math.inf
        self._error_since_recovery_log = False
        self._outage_began = 0.0
        self._failed_in_outage = 0

    def record(self, error: Exception) -> Fault:
        """Count ``error``, log it if it is time to, and say what it was."""
        fault = classify(error)
        now = time.monotonic()
        with self._lock:
            if fault is Fault.UNEXPECTED:
                self.unexpected_errors += 1
            else:
                self.backend_errors += 1
                name = type(error).__name__
                self._by_class[name] = self._by_class.get(name, 0) + 1
                if not self.failing:
                    self.failing, self._outage_began, self._failed_in_outage = True, now, 0
                self._failed_in_outage += 1
            skipped = self._unlogged.get(fault, 0)
            if now - self._logged_at.get(fault, -math.inf) < LOG_INTERVAL:
                self._unlogged[fault] = skipped + 1
                return self._raise_if_unexpected(fault, error)
            self._logged_at[fault] = now
            self._unlogged[fault] = 0
            self._error_since_recovery_log |= fault is not Fault.UNEXPECTED
        _log(fault, error, skipped)
        return self._raise_if_unexpected(fault, error)

    def by_class(self) -> dict[str, int]:
        """``backend_errors`` by exception class name (``TimeoutError``, ``CircuitOpen``, ...)."""
        with self._lock:
            return dict(self._by_class)

    def _raise_if_unexpected(self, fault: Fault, error: Exception) -> Fault:
        if fault is Fault.UNEXPECTED and self.reraise_unexpected:
            raise error
        return fault

    def recovered(self, failures_before: int) -> None:
        """A call succeeded. ``failures_before`` is ``backend_errors`` when it started: a
        call already in flight when Redis failed proves nothing.

        Logged as a WARNING after an ERROR, else at most once a minute (a Cluster
        failover interleaves failures of one node's orgs with successes of the others).
        """
        now = time.monotonic()
        with self._lock:
            if not self.failing or failures_before != self.backend_errors:
                return
            self.failing = False
            if not self._error_since_recovery_log and (
                now - self._recovery_logged_at < LOG_INTERVAL
            ):
                return
            self._error_since_recovery_log = False
            self._recovery_logged_at = now
            failed, lasted = self._failed_in_outage, now - self._outage_began
        logger.warning(
            "usage_guard: Redis is reachable again (%d failed calls over %.1f s)",
            failed,
            lasted,
        )


def _log(fault: Fault, error: Exception, skipped: int) -> None:
    since = f"; {skipped} more failed calls since the last report" if skipped else ""
    cause = f"{type(error).__name__}: {error}"
    if fault is Fault.OUTAGE:
        logger.error("usage_guard: Redis unavailable (%s)%s", cause, since)
    elif fault is Fault.MISCONFIGURED:
        logger.error(
            "usage_guard: Redis refuses this guard's configuration (%s)%s: "
            "check the URL's credentials, ACL permissions and TLS settings",
            cause,
            since,
        )
    else:
        logger.error(
            "usage_guard: unexpected error from the storage client%s",
            since,
            exc_info=(type(error), error, error.__traceback__),
        )
