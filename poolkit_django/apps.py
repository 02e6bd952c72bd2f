"""AppConfig: add "poolkit_django" to INSTALLED_APPS for its checks and management command."""

from __future__ import annotations

from django.apps import AppConfig
from django.conf import settings


class PoolkitDjangoConfig(AppConfig):
    name = "poolkit_django"
    verbose_name = "poolkit connection pools"

    def ready(self) -> None:
        from . import _checks, _middleware
        from ._options import is_ours, pool_config

        _checks.register()
        _middleware.connect_signals()
        # Bad pool settings fail at startup (an ImproperlyConfigured naming the key),
        # not at the first request.
        for alias, db in settings.DATABASES.items():
            if is_ours(db):
                pool_config(alias, db)
