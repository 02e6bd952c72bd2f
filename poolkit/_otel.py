"""OpenTelemetry metric export: instruments with the db.client semantic-convention names."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ._cluster_base import flatten_pools
from ._stats import BOUNDS, Histogram, PoolStats

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Meter, Observation

__all__ = ["OtelInstruments", "instrument_otel"]

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
                out.append(Observation(stats["parked"], {**attrs, _OTEL_STATE: "parked"}))
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
