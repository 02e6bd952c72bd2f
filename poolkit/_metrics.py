"""Metric export: Prometheus text and OpenTelemetry instruments with OTel db.client names."""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ._cluster_base import flatten_pools
from ._stats import BOUNDS, Histogram, PoolStats

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Meter, Observation
    from prometheus_client.metrics_core import Metric

__all__ = ["OtelInstruments", "cumulative", "instrument_otel", "render_prometheus"]

# Exported bucket bounds are a subset of poolkit's (four per doubling), so cumulative
# counts stay exact: one per doubling (10 µs .. 84 s) for the pool-wide histograms, one
# per quadrupling for the per-route ones, whose series count is multiplied by the routes.
POOL_BUCKET_STEP = 4
ROUTE_BUCKET_STEP = 8

_POOL = "pool_name"


def cumulative(hist: Histogram, step: int) -> list[tuple[float, int]]:
    """Cumulative (upper bound, count) pairs at every `step`-th bound, ending with +inf.

    Read without the pool's lock: counts are forced monotonic so a scrape racing a
    borrow never shows a bucket smaller than the one before it.
    """
    pairs = hist.buckets()
    out: list[tuple[float, int]] = []
    high = 0
    for i, (bound, count) in enumerate(pairs[:-1]):
        high = max(high, count)
        if i % step == 0:
            out.append((bound, high))
    out.append((pairs[-1][0], max(high, pairs[-1][1])))
    return out


# -- Prometheus ------------------------------------------------------------------------

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


# -- OpenTelemetry ---------------------------------------------------------------------

_OTEL_POOL = "db.client.connection.pool.name"
_OTEL_STATE = "db.client.connection.state"
_OTEL_ROUTE = "poolkit.route"
_OTEL_BOUNDS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01)
_OTEL_BOUNDS += (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A value standing for each poolkit bucket when replaying it into an OTel histogram: the
# geometric middle of the bucket (within 10 % of any value in it).
_MIDDLES = (BOUNDS[0] / 2, *((lo * hi) ** 0.5 for lo, hi in itertools.pairwise(BOUNDS)))


class OtelInstruments:
    """What `instrument_otel()` registered; `stop()` makes every callback report nothing.

    The OpenTelemetry API has no observable histogram, so the three duration histograms
    (and per-route hold time) are synchronous instruments fed at collection time with
    the samples poolkit counted since the previous collection, one `record()` per
    sample at its bucket's middle value: counts are exact, values within 10 %. The
    cost, about a microsecond per borrow, is paid by the metric reader, not by borrowers.
    """

    def __init__(self, pools: Mapping[str, Any], meter: Meter) -> None:
        self._pools = pools
        self._lock = threading.Lock()
        self._stopped = False
        # (pool key, histogram name or route) -> (id of the pool, bucket counts replayed)
        self._seen: dict[tuple[str, str], tuple[int, list[int]]] = {}
        self.instruments: list[Any] = []
        up_down = meter.create_observable_up_down_counter
        self._add(
            up_down(
                "db.client.connection.count",
                [self._count],
                unit="{connection}",
                description="The number of connections that are currently in the state "
                "described by the state attribute.",
            ),
            up_down(
                "db.client.connection.max",
                [self._gauge("max_size")],
                unit="{connection}",
                description="The maximum number of open connections allowed.",
            ),
            up_down(
                "db.client.connection.idle.max",
                [self._gauge("max_size")],
                unit="{connection}",
                description="The maximum number of idle open connections allowed.",
            ),
            up_down(
                "db.client.connection.idle.min",
                [self._gauge("min_size")],
                unit="{connection}",
                description="The minimum number of idle open connections allowed.",
            ),
            up_down(
                "db.client.connection.pending_requests",
                [self._gauge("waiting")],
                unit="{request}",
                description="The number of current pending requests for an open connection.",
            ),
            meter.create_observable_counter(
                "db.client.connection.timeouts",
                [self._gauge("timeouts")],
                unit="{timeout}",
                description="The number of connection timeouts that have occurred trying to "
                "obtain a connection from the pool.",
            ),
        )
        for field, label in (
            ("borrows", "borrows"),
            ("connections_created", "connections.created"),
            ("connections_failed", "connections.failed"),
            ("connections_lost", "connections.lost"),
            ("leaks_detected", "leaks.detected"),
            ("leaks_reclaimed", "leaks.reclaimed"),
        ):
            self._add(meter.create_observable_counter(f"poolkit.{label}", [self._gauge(field)]))
        self._hists = {
            "connect_time": _histogram(
                meter,
                "db.client.connection.create_time",
                "The time it took to create a new connection.",
            ),
            "wait_time": _histogram(
                meter,
                "db.client.connection.wait_time",
                "The time it took to obtain an open connection from the pool.",
            ),
            "hold_time": _histogram(
                meter,
                "db.client.connection.use_time",
                "The time between borrowing a connection and returning it to the pool.",
            ),
        }
        self._route_hist = _histogram(
            meter, "poolkit.hold_time", "Connection hold time by route or view."
        )
        self.instruments.extend(self._hists.values())
        self.instruments.append(self._route_hist)

    def _add(self, *instruments: Any) -> None:
        self.instruments.extend(instruments)

    def stop(self) -> None:
        """Report nothing from now on (the OpenTelemetry API cannot unregister callbacks)."""
        self._stopped = True

    def _count(self, options: CallbackOptions) -> Iterable[Observation]:
        # The first callback of a collection: read every pool once, replay histograms.
        from opentelemetry.metrics import Observation

        if self._stopped:
            return []
        with self._lock:
            out = []
            for key, pool in flatten_pools(self._pools).items():
                name = str(key)
                stats: PoolStats = pool.stats()
                hists = pool.histograms()
                attrs = {_OTEL_POOL: name}
                out.append(Observation(stats["idle"], {**attrs, _OTEL_STATE: "idle"}))
                out.append(Observation(stats["in_use"], {**attrs, _OTEL_STATE: "used"}))
                for field, instrument in self._hists.items():
                    self._replay(pool, (name, field), hists[field], instrument, attrs)
                for route, hist in pool.hold_time_by_tag().items():
                    attrs_route = {**attrs, _OTEL_ROUTE: route}
                    self._replay(pool, (name, "/" + route), hist, self._route_hist, attrs_route)
            return out

    def _gauge(self, field: str) -> Any:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            from opentelemetry.metrics import Observation

            if self._stopped:
                return []
            return [
                Observation(pool.stats()[field], {_OTEL_POOL: str(key)})
                for key, pool in flatten_pools(self._pools).items()
            ]

        return callback

    def _replay(
        self,
        pool: Any,
        key: tuple[str, str],
        hist: Histogram,
        instrument: Any,
        attrs: dict[str, str],
    ) -> None:
        counts = list(hist.counts)
        seen = self._seen.get(key)
        before = seen[1] if seen is not None and seen[0] == id(pool) else [0] * len(counts)
        if any(now < then for now, then in zip(counts, before, strict=True)):
            before = [0] * len(counts)  # the histogram restarted (a rebuilt pool)
        self._seen[key] = (id(pool), counts)
        record = instrument.record
        for i, (now, then) in enumerate(zip(counts, before, strict=True)):
            if now > then:
                value = _MIDDLES[i] if i < len(_MIDDLES) else hist.max
                for _ in range(now - then):
                    record(value, attrs)


def _histogram(meter: Meter, name: str, description: str) -> Any:
    try:
        return meter.create_histogram(
            name, unit="s", description=description,
            explicit_bucket_boundaries_advisory=_OTEL_BOUNDS,
        )  # fmt: skip
    except TypeError:  # opentelemetry-api < 1.23: no advisory boundaries
        return meter.create_histogram(name, unit="s", description=description)


def instrument_otel(pools: Mapping[str, Any], meter: Meter | None = None) -> OtelInstruments:
    """Register OpenTelemetry instruments reporting `pools` (keys name the pools).

    `pools` is read at every collection, so a live registry may gain pools later. Uses
    `meter`, or the global MeterProvider's "poolkit" meter. Needs the `otel` extra
    (opentelemetry-api) and an SDK or agent configured by the application.
    """
    try:
        from opentelemetry import metrics
    except ImportError as exc:
        raise ImportError(
            "instrument_otel() needs opentelemetry-api: pip install 'poolkit[otel]'"
        ) from exc
    if meter is None:
        meter = metrics.get_meter("poolkit")
    return OtelInstruments(pools, meter)
