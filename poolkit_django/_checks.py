"""System checks for DATABASES entries that use poolkit_django."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks

from ._options import is_ours


def check_databases(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    messages: list[checks.CheckMessage] = []
    for alias, db in settings.DATABASES.items():
        if not is_ours(db) or not (db.get("OPTIONS") or {}).get("pool", True):
            continue
        max_age = db.get("CONN_MAX_AGE", 0)
        if max_age != 0:
            messages.append(
                checks.Warning(
                    f"DATABASES[{alias!r}]['CONN_MAX_AGE']={max_age!r} is ignored: "
                    "poolkit_django pools connections.",
                    hint=(
                        "Each request borrows a connection from the pool and returns it at "
                        "the end, so connections are reused without pinning one per thread. "
                        "Remove CONN_MAX_AGE (or set it to 0); tune OPTIONS['pool'] "
                        "(max_lifetime, max_idle) to control how long connections live."
                    ),
                    id="poolkit_django.W001",
                )
            )
    return messages


def register() -> None:
    # The registry is a set: registering again (app ready() and backend import) is harmless.
    checks.register(check_databases)
