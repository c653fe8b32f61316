"""The one error table: what an exception from a storage client means.

Every client (the lean ``redis://`` one, redis-py's clients, fakeredis) raises
redis-py's exception classes, so one table decides for all of them:

* ``OUTAGE``: Redis cannot answer now — refused, reset, timed out, ``LOADING``,
  ``BUSY``, ``MASTERDOWN``, ``CLUSTERDOWN``, ``TRYAGAIN``, ``READONLY`` (a
  demoted master), ``OOM``, ``MISCONF`` (cannot persist), a cluster redirect
  that did not settle. The outage policy (``on_backend_error``) decides.
* ``MISCONFIGURED``: it will not answer until someone changes a setting —
  authentication, ``NOPERM``, TLS (an unverified certificate, TLS spoken to a
  plain port). ``ping()`` raises it; at run time the policy decides too, and it
  is logged at ERROR once a minute.
* ``DATA``: a counter holds no integer (an operator's ``SET`` typo, another type);
  the scripts counted nothing, and the guard raises
  :class:`~usage_guard.CorruptedCounter` naming the key.
* ``UNEXPECTED``: anything else (a script error, a bug). The policy still
  answers the request, but it is logged with its traceback and counted apart,
  so a bug never hides as an outage.
"""

from __future__ import annotations

import enum
import ssl
import traceback

from redis import exceptions as redis_errors


class CircuitOpen(redis_errors.ConnectionError):
    """A call not sent: the node failed, and the breaker waits for its probe to succeed."""


class BudgetSpent(redis_errors.TimeoutError):
    """A call not sent: its request has already waited its ``timeout`` for Redis."""


class LateReply(redis_errors.TimeoutError):
    """A call Redis ran after its caller's deadline: its script did what the outage
    policy answers instead of deciding (see :mod:`usage_guard.servertime`)."""


class PlanChanging(redis_errors.TimeoutError):
    """An org's plan changed during each try of a call (see ``PLAN_TRIES``): the script
    changed nothing, and the outage policy answers."""


class Fault(enum.Enum):
    OUTAGE = "outage"
    MISCONFIGURED = "misconfigured"
    #: A counter that holds no integer: the scripts counted nothing and said which.
    DATA = "data"
    UNEXPECTED = "unexpected"


_MISCONFIGURED: tuple[type[BaseException], ...] = (
    redis_errors.AuthenticationError,
    redis_errors.AuthenticationWrongNumberOfArgsError,
    redis_errors.AuthorizationError,
    redis_errors.NoPermissionError,
    redis_errors.ExternalAuthProviderError,
    # Local files a URL names (ssl_ca_certs, ssl_certfile) that cannot be read.
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
)
# Error replies redis-py leaves as a bare ResponseError that still mean "not now".
_OUTAGE_REPLIES = (
    "BUSY ",
    "MISCONF ",
    "MASTERDOWN ",
    "LOADING ",
    "TRYAGAIN ",
    "CLUSTERDOWN ",
    "NOREPLICAS ",  # min-replicas-to-write: too few replicas answer
)
_OUTAGE: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,  # BusyLoadingError (LOADING) and MaxConnectionsError too
    redis_errors.TimeoutError,
    redis_errors.OutOfMemoryError,
    redis_errors.ReadOnlyError,
    redis_errors.TryAgainError,
    redis_errors.AskError,  # MovedError too: a redirect the client could not follow
    redis_errors.ClusterError,  # ClusterDownError, MasterDownError, "TTL exhausted"
    redis_errors.RedisClusterException,  # no node for a slot, cluster not initialised
    OSError,  # TimeoutError, ConnectionError and ssl.SSLError among them
)


#: How the scripts report a counter that holds no integer (lua/_lib.lua's corrupted()).
DATA_REPLY = "UGDATA "
# A script's command refused by the ACL: NOPERM, reported as a script error.
_SCRIPT_NOPERM = "The user executing the script can't run this command"


def classify(error: BaseException) -> Fault:
    """What ``error``, raised by a storage client, means for the request."""
    if _misconfigured(error) or (
        isinstance(error, redis_errors.ResponseError) and _SCRIPT_NOPERM in str(error)
    ):
        return Fault.MISCONFIGURED
    if isinstance(error, redis_errors.ResponseError) and not isinstance(error, _OUTAGE):
        message = str(error)
        if message.startswith(DATA_REPLY):
            return Fault.DATA
        return Fault.OUTAGE if message.startswith(_OUTAGE_REPLIES) else Fault.UNEXPECTED
    if isinstance(error, _OUTAGE) or _redis_py_lost_its_connection(error):
        return Fault.OUTAGE
    return Fault.UNEXPECTED


# TLS failures that a retry may cure: the peer went away mid-handshake.
_TLS_TRANSIENT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


def _misconfigured(error: BaseException) -> bool:
    """The error, or what it wraps (clients wrap TLS errors in ConnectionError). Every TLS
    error but a dropped connection is one: an unverified certificate, a client certificate
    the server asks for, TLS spoken to a port that does not."""
    seen: BaseException | None = error
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, _MISCONFIGURED) or (
            isinstance(seen, ssl.SSLError) and not isinstance(seen, _TLS_TRANSIENT)
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _redis_py_lost_its_connection(error: BaseException) -> bool:
    """redis-py's async cluster client, when a node's connection is closed under a command
    in flight, fails with ``'NoneType' object has no attribute ...`` inside its own code."""
    if not isinstance(error, AttributeError) or "'NoneType' object" not in str(error):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and "/redis/" in frames[-1].filename.replace("\\", "/")
