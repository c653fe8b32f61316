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
    on (see :mod:`usage_guard.settling`).
    """

    #: The test suite sets it: there an unexpected error fails the test instead.
    reraise_unexpected: ClassVar[bool] = False

    def __init__(self) -> None:
        self.backend_errors = 0
        self.unexpected_errors = 0
        self.unsettled = 0
        #: Whether a failure was logged and no success has been logged since.
        self.failing = False
        self._lock = threading.Lock()
        self._logged_at: dict[Fault, float] = {}
        self._unlogged: dict[Fault, int] = {}
        self._first_failure = math.inf
        self._failed = 0

    def record(self, error: Exception) -> Fault:
        """Count ``error``, log it if it is time to, and say what it was."""
        fault = classify(error)
        now = time.monotonic()
        with self._lock:
            if fault is Fault.UNEXPECTED:
                self.unexpected_errors += 1
            else:
                self.backend_errors += 1
                self._failed += 1
                self._first_failure = min(self._first_failure, now)
            skipped = self._unlogged.get(fault, 0)
            if now - self._logged_at.get(fault, -math.inf) < LOG_INTERVAL:
                self._unlogged[fault] = skipped + 1
                return self._raise_if_unexpected(fault, error)
            self._logged_at[fault] = now
            self._unlogged[fault] = 0
            self.failing = self.failing or fault is not Fault.UNEXPECTED
        _log(fault, error, skipped)
        return self._raise_if_unexpected(fault, error)

    def _raise_if_unexpected(self, fault: Fault, error: Exception) -> Fault:
        if fault is Fault.UNEXPECTED and self.reraise_unexpected:
            raise error
        return fault

    def recovered(self, failures_before: int) -> None:
        """A call succeeded: say so once if failures were logged and none was recorded while
        it ran (``failures_before``: ``backend_errors`` when it started). A call already in
        flight when Redis failed proves nothing."""
        with self._lock:
            if not self.failing or failures_before != self.backend_errors:
                return
            self.failing = False
            failed, self._failed = self._failed, 0
            lasted = time.monotonic() - self._first_failure
            self._first_failure = math.inf
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
