"""Prometheus metric export: the text exposition of the pools, with OTel db.client names."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ._buckets import POOL_BUCKET_STEP, ROUTE_BUCKET_STEP, cumulative
from ._cluster_base import flatten_pools
from ._stats import PoolStats

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["render_prometheus"]

_POOL = "pool_name"

# (metric name without _total, stats key, help); all labelled by pool_name.
_GAUGES = (
    ("db_client_connection_max", "max_size", "The maximum number of open connections allowed."),
    (
        "db_client_connection_idle_max",
        "max_size",
        "The maximum number of idle open connections allowed (poolkit: max_size).",
    ),
    (
        "db_client_connection_idle_min",
        "min_size",
        "The minimum number of idle open connections allowed (poolkit: min_size).",
    ),
    (
        "db_client_connection_pending_requests",
        "waiting",
        "The number of current pending requests for an open connection.",
    ),
    ("poolkit_pool_size", "size", "Connections the pool holds or is opening (idle + used + busy)."),
)
_COUNTERS = (
    (
        "db_client_connection_timeouts",
        "timeouts",
        "The number of connection timeouts that have occurred trying to obtain a connection.",
    ),
    ("poolkit_borrows", "borrows", "Connections lent out."),
    ("poolkit_requests_rejected", "rejected", "Borrows refused because max_waiting was reached."),
    ("poolkit_connections_created", "connections_created", "Connections opened."),
    ("poolkit_connections_closed", "connections_closed", "Connections closed by the pool."),
    ("poolkit_connections_failed", "connections_failed", "Connection attempts that failed."),
    ("poolkit_connections_lost", "connections_lost", "Connections found broken."),
    ("poolkit_leaks_detected", "leaks_detected", "Borrows that outlived leak_threshold."),
    (
        "poolkit_leaks_reclaimed",
        "leaks_reclaimed",
        "Borrowed connections garbage-collected without being returned.",
    ),
    ("poolkit_validations_run", "validations_run", "Borrow-time validations that ran a query."),
    (
        "poolkit_validations_skipped",
        "validations_skipped",
        "Borrow-time validations skipped inside the bypass window.",
    ),
    ("poolkit_validations_failed", "validations_failed", "Borrow-time validations that failed."),
    ("poolkit_resets", "resets", "Session resets run on returned connections."),
)
_HISTOGRAMS = (
    (
        "db_client_connection_create_time_seconds",
        "connect_time",
        "The time it took to create a new connection.",
    ),
    (
        "db_client_connection_wait_time_seconds",
        "wait_time",
        "The time it took to obtain an open connection from the pool.",
    ),
    (
        "db_client_connection_use_time_seconds",
        "hold_time",
        "The time between borrowing a connection and returning it to the pool.",
    ),
)


class _PoolCollector:
    """A prometheus_client collector reading the pools at scrape time."""

    def __init__(self, pools: Mapping[str, Any]) -> None:
        self._pools = pools

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        count = GaugeMetricFamily(
            "db_client_connection_count",
            "The number of connections that are currently in state described by the state label.",
            labels=[_POOL, "state"],
        )
        gauges = [GaugeMetricFamily(n, h, labels=[_POOL]) for n, _, h in _GAUGES]
        longest = GaugeMetricFamily(
            "poolkit_borrow_longest_seconds",
            "How long the longest current borrow has been held (0 when none).",
            labels=[_POOL],
        )
        counters = [CounterMetricFamily(n, h, labels=[_POOL]) for n, _, h in _COUNTERS]
        hists = [HistogramMetricFamily(n, h, labels=[_POOL]) for n, _, h in _HISTOGRAMS]
        by_route = HistogramMetricFamily(
            "poolkit_hold_time_seconds",
            "Connection hold time by route or view (at most 100 routes, then '(other)').",
            labels=[_POOL, "route"],
        )
        pools, hosts = _expand_clusters(self._pools)
        for key, pool in pools.items():
            name = str(key)
            stats: PoolStats = pool.stats()
            # wait_time includes the immediate borrows (the pools count them apart).
            histograms = pool.histograms()
            count.add_metric([name, "idle"], stats["idle"])
            count.add_metric([name, "used"], stats["in_use"])
            count.add_metric([name, "parked"], stats["parked"])
            for gauge, (_, field, _) in zip(gauges, _GAUGES, strict=True):
                gauge.add_metric([name], stats[field])  # type: ignore[literal-required]
            borrows = pool.borrowed()
            longest.add_metric([name], borrows[0].held_for if borrows else 0.0)
            for counter, (_, field, _) in zip(counters, _COUNTERS, strict=True):
                counter.add_metric([name], stats[field])  # type: ignore[literal-required]
            for histogram, (_, field, _) in zip(hists, _HISTOGRAMS, strict=True):
                hist = histograms[field]
                histogram.add_metric(
                    [name], _prom_buckets(cumulative(hist, POOL_BUCKET_STEP)), hist.sum
                )
            for route, hist in sorted(pool.hold_time_by_tag().items()):
                by_route.add_metric(
                    [name, route], _prom_buckets(cumulative(hist, ROUTE_BUCKET_STEP)), hist.sum
                )
        yield count
        yield from gauges
        yield from hosts
        yield longest
        yield from counters
        yield from hists
        yield by_route


def _expand_clusters(pools: Mapping[str, Any]) -> tuple[dict[str, Any], list[Metric]]:
    """Cluster pools become their hosts' pools, plus per-host role, health and lag gauges."""
    from prometheus_client.core import GaugeMetricFamily

    labels = [_POOL, "host", "role"]
    up = GaugeMetricFamily(
        "poolkit_host_up", "1 when the host answered its last probe.", labels=labels
    )
    lag = GaugeMetricFamily(
        "poolkit_host_replication_lag_seconds",
        "Replay lag measured on the replica (0 for a primary).",
        labels=labels,
    )
    for key, pool in list(pools.items()):
        if not hasattr(pool, "host_pools"):
            continue
        for host in pool.stats()["hosts"]:
            values = [str(key), host["host"], host["role"]]
            up.add_metric(values, 1.0 if host["healthy"] else 0.0)
            lag.add_metric(values, host["lag"] or 0.0)
    clusters = any(hasattr(p, "host_pools") for p in pools.values())
    return flatten_pools(pools), [up, lag] if clusters else []


def _prom_buckets(pairs: list[tuple[float, int]]) -> list[tuple[str, float]]:
    # `le` label values as Prometheus writes them ("+Inf", shortest float repr).
    return [("+Inf" if bound == math.inf else repr(bound), float(n)) for bound, n in pairs]


def render_prometheus(pools: Mapping[str, Any]) -> tuple[bytes, str]:
    """The Prometheus text exposition of `pools` (keys become the pool_name label).

    Returns (body, content type) for a metrics endpoint. Reads the pools without I/O
    and without their locks, so it is safe to call from any thread or the event loop.
    Needs the `prometheus` extra (prometheus-client).
    """
    try:
        from prometheus_client import exposition
        from prometheus_client.registry import CollectorRegistry
    except ImportError as exc:
        raise ImportError(
            "render_prometheus() needs prometheus-client: pip install 'poolkit[prometheus]'"
        ) from exc
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_PoolCollector(pools))
    # Our names are all legacy-valid, so the widely understood 0.0.4 format is exact.
    content_type = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)
    return exposition.generate_latest(registry), content_type
