"""The live pool dashboard: its HTML page and the JSON snapshot it polls."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from importlib import resources
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ._buckets import POOL_BUCKET_STEP, cumulative
from ._cluster_base import flatten_pools
from ._config import mask_conninfo
from ._dashboard_history import DashboardHistory
from ._stats import Histogram

# DashboardHistory lives in _dashboard_history; it is part of the dashboard's API, and
# the integrations import it from here with the page and the snapshot.
__all__ = ["DashboardHistory", "dashboard_html", "dashboard_snapshot", "snapshot_json"]

SNAPSHOT_VERSION = 1
TOP_TAGS = 10
MAX_BORROWS = 25
MAX_EVENTS = 50
# Outages and recoveries are kept for the whole history window, however many timeouts
# or leak warnings come between them: they are what the event list is for.
LIFECYCLE_EVENTS = frozenset({"connection-lost", "recovered"})
_CONNINFO_KEYS = ("user", "password", "host", "port", "dbname")
# Configuration shown on the page; never conninfo or kwargs (they may carry secrets).
CONFIG_FIELDS = (
    "min_size",
    "max_size",
    "timeout",
    "max_waiting",
    "max_lifetime",
    "max_idle",
    "validate",
    "validation_bypass",
    "leak_threshold",
    "reset",
    "pgbouncer",
)


def dashboard_html(data_url: str | None = None) -> str:
    """The dashboard page: one self-contained HTML document (no CDN, works offline).

    Serve it at ``{prefix}/``; it polls ``{prefix}/data`` (relative to its own URL) for
    `dashboard_snapshot()`, or `data_url` when given. Put both routes behind the same
    authentication as the rest of the app's operator pages.
    """
    html = (resources.files("poolkit") / "dashboard.html").read_text(encoding="utf-8")
    if data_url is not None:
        html = html.replace(
            '<meta name="poolkit-data-url" content="">',
            f'<meta name="poolkit-data-url" content="{_attr(data_url)}">',
        )
    return html


def _attr(value: str) -> str:
    return (
        value.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")
    )


def dashboard_snapshot(
    pools: Mapping[str, Any], history: DashboardHistory | None = None
) -> dict[str, Any]:
    """Everything the dashboard shows, as a JSON-able dict, passwords masked everywhere.

    Per pool: stats(), wait/hold/connect histograms, the routes holding connections
    longest, current borrows (longest first, with their borrow site), recent events and,
    with a `history`, the last minutes of size/in_use/idle/waiting.
    """
    pools = flatten_pools(pools)  # a cluster shows as one pool per host
    if history is not None:
        history.sample_if_due(pools)
    now_mono = time.monotonic()
    now_wall = time.time()
    out_pools = []
    for key, pool in list(pools.items()):
        name = str(key)
        stats = dict(pool.stats())
        hists = pool.histograms()
        config = getattr(pool, "config", None)
        item: dict[str, Any] = {
            "key": name,
            "name": stats.get("name", name),
            "conninfo": _shown_conninfo(config),
            "config": {f: _jsonable(getattr(config, f, None)) for f in CONFIG_FIELDS},
            "stats": stats,
            "histograms": {k: _hist(h) for k, h in hists.items()},
            "top_tags": _top_tags(pool.hold_time_by_tag()),
            "borrowed": [
                {
                    "held_for": round(b.held_for, 3),
                    "site": b.site,
                    "owner": b.owner,
                    "tag": b.tag,
                    "leak_suspect": b.leak_suspect,
                }
                for b in pool.borrowed()[:MAX_BORROWS]
            ],
            "borrowed_total": stats.get("in_use", 0),
            "events": _events(pool.events(), history, name, now_mono, now_wall),
            "history": history.series(name, now_mono) if history is not None else None,
        }
        out_pools.append(item)
    snapshot = {
        "version": SNAPSHOT_VERSION,
        "generated_at": now_wall,
        "history_interval": history.interval if history is not None else None,
        "history_window": history.window if history is not None else None,
        "pools": out_pools,
    }
    masked: dict[str, Any] = _masked(snapshot)
    return masked


def _shown_conninfo(config: Any) -> str:
    """The server a pool connects to, as a URL with the password masked.

    Django passes host, user and dbname as connection kwargs, not in `conninfo`: both
    are read, so every integration's dashboard names the server the same way.
    """
    if config is None:
        return ""
    kwargs = getattr(config, "kwargs", None) or {}
    extra = {k: kwargs[k] for k in _CONNINFO_KEYS if kwargs.get(k) not in (None, "")}
    conninfo = str(getattr(config, "conninfo", "") or "")
    if not extra:
        return mask_conninfo(conninfo)
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return mask_conninfo(conninfo)
    params.update(extra)
    user = quote(str(params.get("user", "")), safe="")
    credentials = f"{user}:***@" if params.get("password") else (f"{user}@" if user else "")
    host = str(params.get("host", ""))
    if ":" in host and "," not in host:
        host = f"[{host}]"  # IPv6
    port = f":{params['port']}" if params.get("port") else ""
    dbname = quote(str(params.get("dbname", "")), safe="")
    return f"postgresql://{credentials}{quote(host, safe='[]:,/')}{port}/{dbname}"


def _events(
    recent: list[tuple[float, str, str]],
    history: DashboardHistory | None,
    key: str,
    now_mono: float,
    now_wall: float,
) -> list[dict[str, Any]]:
    """Newest first: every outage and recovery in the history window, and the latest
    other events, with a run of the same kind (a burst of timeouts) shown as one row."""
    events = list(recent)
    if history is not None:
        events = sorted({*history.events(key, now_mono), *recent})
    rows: list[dict[str, Any]] = []
    others = 0
    prev: str | None = None  # the kind of the row just added, if the previous event made one
    for t, kind, detail in reversed(events):
        if kind == prev and kind not in LIFECYCLE_EVENTS:
            rows[-1]["count"] += 1
            rows[-1]["first_ago"] = round(now_mono - t, 3)
            continue
        prev = None
        if kind not in LIFECYCLE_EVENTS:
            others += 1
            if others > MAX_EVENTS:
                continue
        prev = kind
        rows.append(
            {
                "ago": round(now_mono - t, 3),
                "at": now_wall - (now_mono - t),
                "kind": kind,
                "detail": detail,
                "count": 1,
                "first_ago": round(now_mono - t, 3),
            }
        )
    return rows


def _hist(h: Histogram) -> dict[str, Any]:
    pairs = cumulative(h, POOL_BUCKET_STEP)
    return {
        # cumulative counts at each upper bound (seconds); the last bound (null) is +inf
        "buckets": [[None if b == float("inf") else b, n] for b, n in pairs],
        "count": pairs[-1][1],
        "sum": h.sum,
        "max": h.max,
        "p50": h.quantile(0.5),
        "p99": h.quantile(0.99),
    }


def _top_tags(tags: Mapping[str, Histogram]) -> list[dict[str, Any]]:
    rows = sorted(tags.items(), key=lambda kv: kv[1].sum, reverse=True)[:TOP_TAGS]
    return [
        {
            "tag": tag,
            "count": h.count,
            "sum": h.sum,
            "mean": h.sum / h.count if h.count else 0.0,
            "p50": h.quantile(0.5),
            "p99": h.quantile(0.99),
            "max": h.max,
        }
        for tag, h in rows
    ]


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return getattr(value, "__qualname__", None) or type(value).__name__  # a reset callable


def _masked(value: Any) -> Any:
    """`value` with every string passed through mask_conninfo (sites, details, tags...)."""
    if isinstance(value, str):
        return mask_conninfo(value)
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    return value


def snapshot_json(pools: Mapping[str, Any], history: DashboardHistory | None = None) -> bytes:
    """`dashboard_snapshot()` encoded as JSON bytes (no NaN/Infinity: strict JSON)."""
    return json.dumps(dashboard_snapshot(pools, history), allow_nan=False).encode()
