"""``guard.ping()``: can the guard work with its Redis, and can that Redis lose counters?

Pure: :data:`PROBES` are the commands a ping sends (after the connection's own
``AUTH``/``SELECT``), :func:`assess` reads what came back; the guards send them. A misconfiguration
(credentials, ACL, TLS) raises :class:`~usage_guard.BackendMisconfigured`, an
outage :class:`~usage_guard.BackendUnavailable`; a server that may evict or
lose counters is reported in :attr:`Health.warnings` (and logged as WARNING
by the guard).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from redis.exceptions import ResponseError

from .errors import BackendMisconfigured, BackendUnavailable
from .faults import Fault, classify
from .scripts import SCRIPTS, SOURCES

logger = logging.getLogger("usage_guard")

#: The oldest Redis the scripts and ``AUTH user password`` work with.
MIN_VERSION = (6, 0)


@dataclass(frozen=True, slots=True)
class Probe:
    """One command of a ping. A required one must succeed; an optional one may be refused
    (ACL) or unknown (renamed on managed services) and then says nothing."""

    name: str
    args: tuple[str, ...]
    required: bool = False

    def stops(self, reply: Any) -> bool:
        """Whether ``reply`` ends the ping: a failure it cannot go past."""
        if not isinstance(reply, Exception):
            return False
        refused = isinstance(reply, ResponseError) and classify(reply) is not Fault.OUTAGE
        return self.required or not refused


_SETTINGS = ("maxmemory-policy", "save", "appendonly")
#: What a ping sends, in order, after the connection's own AUTH and SELECT. EVAL is what
#: the scripts need (the clients load them with it after NOSCRIPT); SCRIPT LOAD primes
#: every node but may be refused to a user who can still EVAL.
PROBES: tuple[Probe, ...] = (
    Probe("eval", ("EVAL", "return 1", "0"), required=True),
    *(Probe(f"load {name}", ("SCRIPT", "LOAD", SOURCES[name])) for name in SCRIPTS),
    Probe("server", ("INFO", "server")),
    Probe("replication", ("INFO", "replication")),
    *(Probe(setting, ("CONFIG", "GET", setting)) for setting in _SETTINGS),
)


@dataclass(frozen=True, slots=True)
class Health:
    """What :meth:`UsageGuard.ping` found. ``warnings`` name what could lose counters."""

    url: str
    version: str | None
    warnings: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.warnings


def redacted(url: str) -> str:
    """Where ``url`` points, ``scheme://host:port``, for messages and logs: never its
    credentials, wherever in the URL they are (user info, a query's ``password=``)."""
    scheme, _, rest = url.partition("://")
    where = re.split(r"[/?#]", rest.rpartition("@")[2], maxsplit=1)[0]
    if not re.fullmatch(r"[\w.\-:\[\],]*", where):
        where = "…"
    return f"{scheme}://{where}"


def assess(url: str, replies: Sequence[Any]) -> Health:
    """Read the replies to :data:`PROBES`, in order (an exception where a command failed);
    they end at the first that :meth:`Probe.stops` the ping."""
    answered: dict[str, Any] = {}
    for probe, reply in zip(PROBES, replies, strict=False):
        if probe.stops(reply):
            raise _unusable(url, reply)
        if not isinstance(reply, Exception):
            answered[probe.name] = reply
    version = _field(answered.get("server"), "redis_version")
    warnings = []
    if version is not None and tuple(int(p) for p in version.split(".")[:2]) < MIN_VERSION:
        warnings.append(f"Redis {version} is older than 6.0, which usage_guard needs")
    if _field(answered.get("replication"), "role") in ("slave", "replica"):
        warnings.append("this is a read-only replica: every consumption will fail (READONLY)")
    settings: dict[str, str] = {}
    for setting in _SETTINGS:
        if setting in answered:
            settings.update(_pairs(answered[setting]))
    policy = settings.get("maxmemory-policy")
    if policy is not None and policy != "noeviction":
        warnings.append(
            f"maxmemory-policy is {policy!r}: Redis may evict counters when memory is full "
            "(use noeviction: writes then fail and on_backend_error decides)"
        )
    if settings.get("save") == "" and settings.get("appendonly") == "no":
        warnings.append(
            "persistence is off (no RDB save points, no AOF): a restart loses every counter"
        )
    health = Health(redacted(url), version, tuple(warnings))
    for warning in health.warnings:
        logger.warning("usage_guard: %s at %s", warning, health.url)
    return health


def at_startup(ping: Callable[[], Health]) -> Health | None:
    """An integration's start-up check: a misconfiguration stops start-up (raised); an
    unavailable Redis only warns, so a blip during a deploy never becomes a crash loop."""
    try:
        return ping()
    except BackendMisconfigured:
        raise
    except BackendUnavailable as error:
        _starting_anyway(error)
        return None


async def at_startup_async(ping: Callable[[], Awaitable[Health]]) -> Health | None:
    """The async :func:`at_startup`."""
    try:
        return await ping()
    except BackendMisconfigured:
        raise
    except BackendUnavailable as error:
        _starting_anyway(error)
        return None


def _starting_anyway(error: BackendUnavailable) -> None:
    logger.warning(
        "usage_guard: %s; starting anyway: on_backend_error decides until Redis answers", error
    )


def _unusable(url: str, error: Exception) -> Exception:
    """What a ping raises: a library error for outages and misconfigurations, else the bug."""
    fault = classify(error)
    if fault is Fault.UNEXPECTED:
        return error
    where = redacted(url)
    message = str(error).replace(urlsplit(url).password or "\0", "***")
    if len(message) > 300:  # redis-py quotes whole commands, scripts included
        message = message[:300] + "…"
    if fault is Fault.MISCONFIGURED:
        return BackendMisconfigured(
            f"Redis at {where} refuses this guard's configuration: "
            f"{type(error).__name__}: {message}"
        )
    return BackendUnavailable(f"Redis at {where} is unavailable: {type(error).__name__}: {message}")


def _field(info: Any, name: str) -> str | None:
    """One field of an ``INFO`` reply: text (RESP2), or a dict (redis-py parses it)."""
    if info is None:
        return None
    if isinstance(info, Mapping):
        value = info.get(name)
        return None if value is None else str(value)
    for line in str(info).splitlines():
        if line.startswith(f"{name}:"):
            return line.partition(":")[2].strip()
    return None


def _pairs(reply: Any) -> dict[str, str]:
    """``CONFIG GET``'s reply: a flat list (RESP2), or a dict (redis-py parses it)."""
    if isinstance(reply, Mapping):
        return {str(k): str(v) for k, v in reply.items()}
    return {str(k): str(v) for k, v in zip(reply[::2], reply[1::2], strict=True)}
