"""``guard.ping()``: can the guard work with its Redis, and can that Redis lose counters?

Pure: :data:`PROBES` are the commands a ping sends (after the connection's own
``AUTH``/``SELECT``), :func:`assess` reads what came back. A misconfiguration
(credentials, ACL, TLS) raises :class:`~usage_guard.BackendMisconfigured`, an
outage :class:`~usage_guard.BackendUnavailable`; a server that may evict or
lose counters is reported in :attr:`Health.warnings` (and logged as WARNING
by the guard).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.exceptions import ResponseError

from .errors import BackendMisconfigured, BackendUnavailable
from .faults import Fault, classify
from .scripts import SCRIPTS, SOURCES

logger = logging.getLogger("usage_guard")

#: The oldest Redis the scripts and ``AUTH user password`` work with.
MIN_VERSION = (6, 0)
_SETTINGS = ("maxmemory-policy", "save", "appendonly")
#: What a ping sends: loading each script proves EVAL is allowed and primes every node.
PROBES: tuple[tuple[str, ...], ...] = (
    *(("SCRIPT", "LOAD", SOURCES[name]) for name in SCRIPTS),
    ("INFO", "server"),
    *(("CONFIG", "GET", setting) for setting in _SETTINGS),
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
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def assess(url: str, replies: Sequence[Any]) -> Health:
    """Read the replies to :data:`PROBES` (an exception where a command failed)."""
    scripts, optional = replies[: len(SCRIPTS)], replies[len(SCRIPTS) :]
    for reply in scripts:
        if isinstance(reply, Exception):
            raise _unusable(url, reply)
    for reply in optional:
        # INFO and CONFIG may be refused (ACL) or renamed (managed services): then they
        # say nothing; the scripts, which the guard needs, loaded.
        if isinstance(reply, Exception) and not (
            isinstance(reply, ResponseError) and classify(reply) is not Fault.OUTAGE
        ):
            raise _unusable(url, reply)
    info, *settings = (None if isinstance(r, Exception) else r for r in optional)
    version = None if info is None else _version(info)
    warnings = []
    if version is not None and tuple(int(p) for p in version.split(".")[:2]) < MIN_VERSION:
        warnings.append(f"Redis {version} is older than 6.0, which usage_guard needs")
    read: dict[str, str] = {}
    for reply in settings:
        if reply is not None:
            read.update(_pairs(reply))
    policy = read.get("maxmemory-policy")
    if policy is not None and policy != "noeviction":
        warnings.append(
            f"maxmemory-policy is {policy!r}: Redis may evict counters when memory is full "
            "(use noeviction: writes then fail and on_backend_error decides)"
        )
    if read.get("save") == "" and read.get("appendonly") == "no":
        warnings.append(
            "persistence is off (no RDB save points, no AOF): a restart loses every counter"
        )
    health = Health(redacted(url), version, tuple(warnings))
    for warning in health.warnings:
        logger.warning("usage_guard: %s at %s", warning, health.url)
    return health


def probe(command: Callable[..., Any], args: Sequence[str]) -> Any:
    """One probe's reply, or the exception it raised (for :func:`assess` to read)."""
    try:
        return command(*args)
    except Exception as error:
        return error


async def aprobe(command: Callable[..., Awaitable[Any]], args: Sequence[str]) -> Any:
    try:
        return await command(*args)
    except Exception as error:
        return error


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
    if fault is Fault.MISCONFIGURED:
        return BackendMisconfigured(
            f"Redis at {where} refuses this guard's configuration: "
            f"{type(error).__name__}: {message}"
        )
    return BackendUnavailable(f"Redis at {where} is unavailable: {type(error).__name__}: {message}")


def _version(info: Any) -> str | None:
    if isinstance(info, Mapping):  # redis-py parses INFO
        version = info.get("redis_version")
        return None if version is None else str(version)
    for line in str(info).splitlines():
        if line.startswith("redis_version:"):
            return line.partition(":")[2].strip()
    return None


def _pairs(reply: Any) -> dict[str, str]:
    """``CONFIG GET``'s reply: a flat list (RESP2), or a dict (redis-py parses it)."""
    if isinstance(reply, Mapping):
        return {str(k): str(v) for k, v in reply.items()}
    return {str(k): str(v) for k, v in zip(reply[::2], reply[1::2], strict=True)}
