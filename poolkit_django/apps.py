"""AppConfig: add "poolkit_django" to INSTALLED_APPS for its checks and management command."""

from __future__ import annotations

from django.apps import AppConfig
from django.conf import settings


class PoolkitDjangoConfig(AppConfig):
    name = "poolkit_django"
    verbose_name = "poolkit connection pools"

    def ready(self) -> None:
        from django.db import connections

        from . import _checks, _middleware, _views
        from ._options import check_connect_arguments, is_ours, pool_config

        _checks.register()
        _middleware.connect_signals()
        _views.start_dashboard_history()
        # Bad settings fail at startup (an ImproperlyConfigured naming the key), not at
        # the first request: the pool's and the connection arguments in OPTIONS.
        for alias, db in settings.DATABASES.items():
            if is_ours(db):
                config = pool_config(alias, db)
                if config is not None and db.get("NAME"):
                    # A wrapper of our own: nothing is stored or connected.
                    check_connect_arguments(alias, config, connections.create_connection(alias))
