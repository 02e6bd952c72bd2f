"""Health, Prometheus metrics and dashboard views for the pools of this process."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.utils.module_loading import import_string
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from poolkit import PoolTimeout
from poolkit._dashboard import DashboardHistory, dashboard_html, snapshot_json

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


# What an unauthorised client learns about a failed check: no host, user, SQL state or path.
_REASONS = {
    "exhausted": "every connection is busy",
    "unavailable": "the database cannot be reached",
}


@never_cache
@require_safe  # GET and HEAD: probes and load balancers send HEAD
def health(request: HttpRequest) -> JsonResponse:
    """200 when every pooled database answers ``SELECT 1``, else 503; with each pool's stats.

    The check borrows from the pool (waiting at most HEALTH_TIMEOUT seconds), so it
    proves the whole path a request takes. A pool that is merely busy reports
    "exhausted"; a database that cannot be reached reports "unavailable". The body
    gives a short generic reason; the error itself (which names hosts, users and code
    paths) goes to the log, and to the body only with ``DEBUG`` or for a request that
    ``POOLKIT_DASHBOARD_CHECK`` accepts.
    """
    report: dict[str, Any] = {}
    healthy = True
    details: bool | None = None  # decided at the first failure: the check may cost a lookup
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
        entry: dict[str, Any] = {"status": status}
        if error is not None:
            healthy = False
            logger.warning("health check of %r failed: %s", alias, error)
            if details is None:
                details = _may_see_details(request)
            entry["reason"] = _REASONS[status]
            if details:
                entry["error"] = error
        current = pools().get(alias)
        if current is not None:
            entry["stats"] = current.stats()
        report[alias] = entry
    return JsonResponse(
        {"status": "ok" if healthy else "unavailable", "databases": report},
        status=200 if healthy else 503,
    )


def _may_see_details(request: HttpRequest) -> bool:
    if settings.DEBUG:
        return True
    check = _dashboard_check()
    if check is None:
        return False
    try:
        return bool(check(request))
    except Exception:  # an auth check that fails denies, it does not break the health view
        logger.warning("POOLKIT_DASHBOARD_CHECK raised in the health view", exc_info=True)
        return False


def _dashboard_check() -> Any:
    check: Any = getattr(settings, "POOLKIT_DASHBOARD_CHECK", None)
    return import_string(check) if isinstance(check, str) else check


@never_cache
@require_safe
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text exposition of this process's pools (OpenTelemetry metric names)."""
    try:
        from poolkit._metrics import render_prometheus

        body, content_type = render_prometheus(pools())
    except ImportError as exc:  # poolkit without the prometheus extra
        return HttpResponse(f"{exc}\n", status=501, content_type="text/plain; charset=utf-8")
    return HttpResponse(body, content_type=content_type)


_history = DashboardHistory(pools, interval=1.0, window=300.0)


def start_dashboard_history() -> None:
    """Sample the pools every second from now on, when the dashboard is on, so its chart
    shows the last minutes as soon as the page opens (AppConfig.ready calls this)."""
    if getattr(settings, "POOLKIT_DASHBOARD", False):
        _history.start()


def _dashboard_allowed(request: HttpRequest) -> HttpResponse | None:
    """None when the dashboard may be shown; else the 404/403 to answer.

    Off unless ``POOLKIT_DASHBOARD = True``. ``POOLKIT_DASHBOARD_CHECK`` may name a
    callable ``(request) -> bool`` (a dotted path, or the callable itself), such as a
    staff or permission check, to put it behind the app's own auth.
    """
    if not getattr(settings, "POOLKIT_DASHBOARD", False):
        raise Http404("the poolkit dashboard is off: set POOLKIT_DASHBOARD = True")
    check = _dashboard_check()
    if check is not None and not check(request):
        return HttpResponse("forbidden\n", status=403, content_type="text/plain")
    return None


@never_cache
@require_safe
def dashboard(request: HttpRequest) -> HttpResponse:
    """The live pool dashboard page (refreshes itself from ``dashboard/data``)."""
    denied = _dashboard_allowed(request)
    if denied is not None:
        return denied
    return HttpResponse(dashboard_html(), content_type="text/html; charset=utf-8")


@never_cache
@require_safe
def dashboard_data(request: HttpRequest) -> HttpResponse:
    """The dashboard's JSON snapshot of this process's pools (passwords masked)."""
    denied = _dashboard_allowed(request)
    if denied is not None:
        return denied
    return HttpResponse(snapshot_json(pools(), _history), content_type="application/json")
