"""``"usage_guard.django"`` in ``INSTALLED_APPS``: the setting is checked as Django starts."""

from __future__ import annotations

from django.apps import AppConfig

from ..health import at_startup
from .conf import configuration


class UsageGuardConfig(AppConfig):
    name = "usage_guard.django"
    label = "usage_guard"
    verbose_name = "Usage guard"

    def ready(self) -> None:
        config = configuration()  # a misconfiguration stops Django here, not on a request
        if config.ping_on_startup:
            # A misconfigured Redis stops Django too; an unavailable one only warns.
            at_startup(config.hooks.guard.ping)
