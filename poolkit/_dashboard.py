"""The live pool dashboard: its HTML page, the JSON snapshot it polls and a rolling history."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ._cluster_base import flatten_pools
from ._config import mask_conninfo
from ._metrics import POOL_BUCKET_STEP, cumulative
from ._stats import Histogram

__all__ = ["DashboardHistory", "dashboard_html", "dashboard_snapshot", "snapshot_json"]

PoolsSource = Mapping[str, Any] | Callable[[], Mapping[str, Any]]
SNAPSHOT_VERSION = 1
TOP_TAGS = 10
MAX_BORROWS = 25
MAX_EVENTS = 50
# Outages and recoveries are kept for the whole history window, however many timeouts
# or leak warnings come between them: they are what the event list is for.
LIFECYCLE_EVENTS = frozenset({"connection-lost", "recovered"})
MAX_KEPT_EVENTS = 1000
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


@dataclass(frozen=True, slots=True)
class _Sample:
    t: float  # monotonic
    size: int
    in_use: int
    idle: int
    waiting: int
    borrows: int
    timeouts: int


class DashboardHistory:
    """A rolling record of each pool's size/in_use/idle/waiting, for the dashboard's chart.

    The integration owns one per process. `pools` is a mapping of pools or a callable
    returning one (such as ``poolkit_django.pools``), read at every sample. `start()`
    samples every `interval` seconds in a daemon thread (sampling reads counters only, no
    I/O), or call `sample()` yourself. `dashboard_snapshot()` also samples when a sample is
    due, so the chart fills while the page is open even without the thread. Start it in
    the serving process: after a fork, the thread does not exist in the child.
    """

    def __init__(
        self, pools: PoolsSource | None = None, *, interval: float = 1.0, window: float = 300.0
    ) -> None:
        if interval <= 0 or window < interval:
            raise ValueError(
                f"interval={interval!r}, window={window!r}: use interval > 0 and window >= interval"
            )
        self.pools = pools
        self.interval = interval
        self.window = window
        self._samples: dict[str, deque[_Sample]] = {}
        self._events: dict[str, deque[tuple[float, str, str]]] = {}
        self._lock = threading.Lock()
        self._last = -float("inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fork_hook = False

    def _current(self, pools: Mapping[str, Any] | None) -> Mapping[str, Any]:
        source = self.pools if pools is None else pools
        if source is None:
            return {}
        return source() if callable(source) else source

    def sample(self, pools: Mapping[str, Any] | None = None, now: float | None = None) -> None:
        """Record one sample of every pool now (of `pools`, or of the ones given at init)."""
        if now is None:
            now = time.monotonic()
        if pools is None and self.pools is None:
            return  # nothing to sample yet: keep what snapshots recorded
        current = self._current(pools)
        keep = int(self.window / self.interval) + 1
        with self._lock:
            self._last = now
            for key, pool in list(current.items()):
                st = pool.stats()
                series = self._samples.get(str(key))
                if series is None:
                    series = self._samples[str(key)] = deque(maxlen=keep)
                series.append(
                    _Sample(
                        now,
                        st["size"],
                        st["in_use"],
                        st["idle"],
                        st["waiting"],
                        st["borrows"],
                        st["timeouts"],
                    )
                )
                self._keep_events(str(key), pool.events())
            for key in set(self._samples) - {str(k) for k in current}:
                del self._samples[key]  # a pool that went away
                self._events.pop(key, None)

    def _keep_events(self, key: str, events: list[tuple[float, str, str]]) -> None:
        # The pool keeps its last events only: copy the new ones, so an outage seen by one
        # sample stays listed after a burst of timeouts has pushed it out of the pool's list.
        kept = self._events.get(key)
        if kept is None:
            kept = self._events[key] = deque(maxlen=MAX_KEPT_EVENTS)
        last = kept[-1][0] if kept else -float("inf")
        kept.extend(e for e in events if e[0] > last)

    def events(self, key: str, now: float | None = None) -> list[tuple[float, str, str]]:
        """Every event of one pool seen within the window, oldest first."""
        if now is None:
            now = time.monotonic()
        with self._lock:
            kept = list(self._events.get(key, ()))
        return [e for e in kept if now - e[0] <= self.window]

    def sample_if_due(self, pools: Mapping[str, Any] | None = None) -> None:
        """Sample unless the last sample is younger than `interval`."""
        now = time.monotonic()
        if now - self._last >= self.interval * 0.9:
            self.sample(pools, now)

    def series(self, key: str, now: float | None = None) -> dict[str, list[float]]:
        """One pool's samples as columns; `t` is seconds relative to now (negative)."""
        if now is None:
            now = time.monotonic()
        with self._lock:
            samples = list(self._samples.get(key, ()))
        samples = [s for s in samples if now - s.t <= self.window]
        return {
            "t": [round(s.t - now, 3) for s in samples],
            "size": [s.size for s in samples],
            "in_use": [s.in_use for s in samples],
            "idle": [s.idle for s in samples],
            "waiting": [s.waiting for s in samples],
            "borrows": [s.borrows for s in samples],
            "timeouts": [s.timeouts for s in samples],
        }

    def start(self) -> None:
        """Sample every `interval` seconds in a daemon thread until `stop()`.

        A forked child (gunicorn --preload) starts its own thread: threads do not survive
        a fork, and the child's pools are its own.
        """
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="poolkit-dashboard", daemon=True)
        self._thread.start()
        if not self._fork_hook:
            self._fork_hook = True
            me = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: _restart_in_child(me))

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(5.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            # A pool closing under us must not end the sampling.
            with contextlib.suppress(Exception):
                self.sample()
            self._stop.wait(self.interval)


def _restart_in_child(ref: weakref.ref[DashboardHistory]) -> None:
    history = ref()
    if history is None or history._thread is None or history._stop.is_set():
        return  # gone, or not sampling in the parent
    history._lock = threading.Lock()  # the parent's may have been held by its thread
    history._samples.clear()  # the parent's pools, not the child's
    history._events.clear()
    history._thread = None
    history.start()


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
