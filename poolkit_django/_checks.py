"""System checks for DATABASES entries that use poolkit_django."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks

from ._options import is_ours, release_per_transaction


def check_databases(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    messages: list[checks.CheckMessage] = []
    for alias, db in settings.DATABASES.items():
        if not is_ours(db) or not (db.get("OPTIONS") or {}).get("pool", True):
            continue
        max_age = db.get("CONN_MAX_AGE", 0)
        if max_age == 0:
            continue
        if release_per_transaction(db):
            messages.append(
                checks.Warning(
                    f"DATABASES[{alias!r}]['CONN_MAX_AGE']={max_age!r} has no effect with "
                    "OPTIONS['pool']['release']='transaction'.",
                    hint=(
                        "release='transaction' gives the connection back after every "
                        "statement or transaction, so no connection stays with a thread "
                        "between requests. Set CONN_MAX_AGE to 0, or drop 'release' to keep "
                        "a connection parked with each thread."
                    ),
                    id="poolkit_django.W001",
                )
            )
    return messages


def register() -> None:
    # The registry is a set: registering again (app ready() and backend import) is harmless.
    checks.register(check_databases)
