"""Health and Prometheus metrics views for the pools of this process."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from poolkit import PoolTimeout

from ._options import is_ours
from ._registry import get_pool, pools

logger = logging.getLogger("poolkit.django")

HEALTH_TIMEOUT = 2.0  # seconds a health check waits for a connection


def _pooled_aliases() -> list[str]:
    return [
        alias
        for alias, db in settings.DATABASES.items()
        if is_ours(db) and (db.get("OPTIONS") or {}).get("pool", True)
    ]


@never_cache
@require_GET
def health(request: HttpRequest) -> JsonResponse:
    """200 when every pooled database answers ``SELECT 1``, else 503; with each pool's stats.

    The check borrows from the pool (waiting at most HEALTH_TIMEOUT seconds), so it
    proves the whole path a request takes. A pool that is merely busy reports
    "exhausted"; a database that cannot be reached reports "unavailable".
    """
    report: dict[str, Any] = {}
    healthy = True
    for alias in _pooled_aliases():
        status, error = "ok", None
        pool = None
        try:
            pool = get_pool(alias)
            wait = min(HEALTH_TIMEOUT, pool.timeout)
            with pool.connection(timeout=wait, tag="poolkit.health") as conn:
                conn.execute("SELECT 1")
        except PoolTimeout as exc:
            # Busy (connections exist, all lent) or down (none could be opened).
            stats = pool.stats() if pool is not None else None
            down = stats is None or stats["idle"] + stats["in_use"] == 0
            status, error = ("unavailable" if down else "exhausted"), str(exc)
        except Exception as exc:  # a health check reports, it does not raise
            status, error = "unavailable", f"{type(exc).__name__}: {exc}"
        if status != "ok":
            healthy = False
            logger.warning("health check of %r failed: %s", alias, error)
        entry: dict[str, Any] = {"status": status}
        if error is not None:
            entry["error"] = error
        current = pools().get(alias)
        if current is not None:
            entry["stats"] = current.stats()
        report[alias] = entry
    return JsonResponse(
        {"status": "ok" if healthy else "unavailable", "databases": report},
        status=200 if healthy else 503,
    )


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text exposition of this process's pools (OpenTelemetry metric names)."""
    try:
        from poolkit._metrics import render_prometheus

        body, content_type = render_prometheus(pools())
    except ImportError as exc:  # poolkit without the prometheus extra
        return HttpResponse(f"{exc}\n", status=501, content_type="text/plain; charset=utf-8")
    return HttpResponse(body, content_type=content_type)
