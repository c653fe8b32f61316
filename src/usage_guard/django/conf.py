"""``settings.USAGE_GUARD``: read, imported and checked once (again when a test overrides it).

Keys (dotted paths are strings naming a module attribute; the object itself works too):

- ``GUARD`` (required): dotted path to the application's ``UsageGuard`` (or its async twin).
- ``IDENTIFY`` (required): dotted path to ``identify(request) -> Subject | None``, sync
  or async.
- ``IS_ADMIN``: dotted path to ``is_admin(request, subject) -> bool`` for the Usage
  page's admin endpoints; by default nobody (``is_staff`` marks the vendor's own staff,
  not a customer's admins).
- ``METER``, ``AMOUNT``, ``RULES`` (a list of :class:`~usage_guard.asgi.Rule`, or a
  dotted path to one), ``EXCLUDE``, ``REQUIRE_IDENTITY``, ``STATUS_CODE``,
  ``RATELIMIT_HEADERS``, ``RATE_LIMITS``: as the ASGI middleware's options.
- ``TITLE``, ``TRUSTED_ORIGINS``: the Usage page's.
- ``PING_ON_STARTUP``: ``guard.ping()`` when Django starts.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from asgiref.sync import async_to_sync, sync_to_async
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.utils.module_loading import import_string

from .. import csrf
from ..aio import AsyncUsageGuard
from ..context import AnyGuard
from ..errors import InvalidUsage
from ..guard import UsageGuard
from ..hooks import RequestHooks
from ..web import Identify, from_headers

if TYPE_CHECKING:
    from ..dashboard.page import UsagePage

SETTING = "USAGE_GUARD"
#: Keys of the setting that are options of :class:`~usage_guard.hooks.RequestHooks`.
_HOOK_OPTIONS = {
    "METER": "meter",
    "AMOUNT": "amount",
    "RULES": "rules",
    "EXCLUDE": "exclude",
    "REQUIRE_IDENTITY": "require_identity",
    "STATUS_CODE": "status_code",
    "RATELIMIT_HEADERS": "ratelimit_headers",
    "RATE_LIMITS": "rate_limits",
}
_PAGE_OPTIONS = {"TITLE": "title", "TRUSTED_ORIGINS": "trusted_origins"}
_IMPORTED = ("GUARD", "IDENTIFY", "IS_ADMIN", "RULES")
#: Settings a Python type checker would have caught in code: "false" is a true string.
_TYPES: dict[str, tuple[type, ...]] = {
    "PING_ON_STARTUP": (bool,),
    "REQUIRE_IDENTITY": (bool,),
    "RATELIMIT_HEADERS": (bool,),
    "RATE_LIMITS": (bool, type(None)),
    "METER": (str, type(None)),
    "AMOUNT": (int,),
    "TITLE": (str,),
}
KEYS = frozenset(
    {"GUARD", "IDENTIFY", "IS_ADMIN", "PING_ON_STARTUP", *_HOOK_OPTIONS, *_PAGE_OPTIONS}
)


class Configuration:
    """The setting, imported and checked: what the middleware and the views use."""

    def __init__(self, setting: Mapping[str, Any]) -> None:
        unknown = setting.keys() - KEYS
        if unknown:
            raise ImproperlyConfigured(
                f"unknown {SETTING} keys {sorted(unknown)}; known: {sorted(KEYS)}"
            )
        for required in ("GUARD", "IDENTIFY"):
            if required not in setting:
                raise ImproperlyConfigured(f'{SETTING}["{required}"] is required')
        values = {key: _imported(key, value) for key, value in setting.items()}
        guard = values["GUARD"]
        if not isinstance(guard, UsageGuard | AsyncUsageGuard):
            raise ImproperlyConfigured(
                f'{SETTING}["GUARD"] must name a UsageGuard, not {type(guard).__name__}'
            )
        for key in ("IDENTIFY", "IS_ADMIN"):
            if (key == "IDENTIFY" or values.get(key) is not None) and (
                not callable(values[key]) or isinstance(values[key], type)
            ):
                raise ImproperlyConfigured(
                    f'{SETTING}["{key}"] must name a function or an instance, not {values[key]!r}'
                )
        for key, kinds in _TYPES.items():
            if key in values and not isinstance(values[key], kinds):
                names = " or ".join(
                    "None" if kind is type(None) else kind.__name__ for kind in kinds
                )
                raise ImproperlyConfigured(
                    f'{SETTING}["{key}"] must be {names}, not {type(values[key]).__name__}'
                )
        self.guard: AnyGuard = guard
        self.identify: Identify = values["IDENTIFY"]
        self.is_admin: Callable[..., Any] | None = values.get("IS_ADMIN")
        self.ping_on_startup: bool = values.get("PING_ON_STARTUP", False)
        self.page_options = {
            name: values[key] for key, name in _PAGE_OPTIONS.items() if key in values
        }
        hook_options = {name: values[key] for key, name in _HOOK_OPTIONS.items() if key in values}
        try:
            # Checked now, not on the page's first request: a server's mistake, not a client's.
            csrf.trusted(self.page_options.get("trusted_origins", ()))
            #: For sync (WSGI) Django: an async ``identify`` runs in its own event loop.
            self.hooks = RequestHooks(guard=guard, identify=_sync(self.identify), **hook_options)
            #: For async (ASGI) Django: a sync ``identify`` runs in Django's thread for sync
            #: code (it may read ``request.user``), unless it only reads headers.
            self.async_hooks = RequestHooks(
                guard=guard, identify=_async(self.identify), **hook_options
            )
        except (InvalidUsage, TypeError) as error:
            raise ImproperlyConfigured(f"{SETTING}: {error}") from error

    @functools.cached_property
    def page(self) -> UsagePage:
        """The Usage page the views serve, on the guard's sync side (the ``dashboard`` extra)."""
        from ..dashboard.page import UsagePage

        return UsagePage(
            self.guard,
            identify=_sync(self.identify),
            is_admin=None if self.is_admin is None else _sync(self.is_admin),
            **self.page_options,
        )


@functools.cache
def configuration() -> Configuration:
    setting = getattr(settings, SETTING, None)
    if not isinstance(setting, Mapping):
        raise ImproperlyConfigured(
            f'settings.{SETTING} must be a dict with at least "GUARD" and "IDENTIFY"'
        )
    return Configuration(setting)


def _reload(*, setting: str, **kwargs: Any) -> None:
    if setting == SETTING:
        configuration.cache_clear()


setting_changed.connect(_reload)


def _imported(key: str, value: Any) -> Any:
    if key not in _IMPORTED or not isinstance(value, str):
        return value
    try:
        return import_string(value)
    except ImportError as error:
        raise ImproperlyConfigured(
            f'{SETTING}["{key}"]: cannot import {value!r}: {error}'
        ) from None


def _is_async(function: Any) -> bool:
    """An ``async def``, or an object whose ``__call__`` is one."""
    call = type(function).__call__ if callable(function) else None
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(call)


def _sync(function: Any) -> Any:
    return async_to_sync(function) if _is_async(function) else function


def _async(function: Any) -> Any:
    if _is_async(function) or isinstance(function, from_headers):
        return function
    return sync_to_async(function)
