"""Typed pool statistics: the stats() snapshot and the fixed-bucket time histograms."""

from __future__ import annotations

import math
from typing import TypedDict

# Bucket upper bounds in seconds: 10 µs .. ~84 s, four buckets per doubling. Fixed bounds
# keep recording to one log2 and one list increment, and map 1:1 to Prometheus/OTel
# histogram buckets.
_FIRST_BOUND = 10e-6
_PER_DOUBLING = 4
_NBUCKETS = 4 * 23 + 1
BOUNDS: tuple[float, ...] = tuple(
    _FIRST_BOUND * 2.0 ** (i / _PER_DOUBLING) for i in range(_NBUCKETS)
)


class Histogram:
    """Counts durations (seconds) into fixed log-spaced buckets; keeps exact max and sum.

    Updates are made by the pool while it holds its own lock (or on the event loop), so
    this class takes no lock of its own.
    """

    __slots__ = ("count", "counts", "max", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (_NBUCKETS + 1)  # last slot: above the highest bound
        self.count = 0
        self.sum = 0.0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        if seconds <= _FIRST_BOUND:
            self.counts[0] += 1
            if seconds > self.max:
                self.max = seconds
            self.sum += seconds
            return
        i = math.ceil(math.log2(seconds / _FIRST_BOUND) * _PER_DOUBLING)
        self.counts[i if i < _NBUCKETS else _NBUCKETS] += 1
        self.sum += seconds
        if seconds > self.max:
            self.max = seconds

    def quantile(self, q: float, zeros: int = 0) -> float:
        """Upper bound of the bucket holding the q-quantile, capped by the exact max.

        `zeros` adds that many zero durations counted elsewhere (the pools count
        immediate borrows in a plain integer to keep the fast path short).
        """
        if not self.count + zeros:
            return 0.0
        rank = q * (self.count + zeros)
        seen = zeros
        if seen >= rank:
            return 0.0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank and n:
                bound = BOUNDS[i] if i < _NBUCKETS else self.max
                return min(bound, self.max) if self.max else 0.0
        return self.max

    def buckets(self) -> list[tuple[float, int]]:
        """Cumulative (upper bound, count) pairs, ending with (+inf, count)."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, n in zip(BOUNDS, self.counts, strict=False):
            total += n
            out.append((bound, total))
        out.append((math.inf, self.count))
        return out

    def summary(self, zeros: int = 0) -> TimeSummary:
        return {
            "count": self.count + zeros,
            "p50": self.quantile(0.5, zeros),
            "p99": self.quantile(0.99, zeros),
            "max": self.max,
            "sum": self.sum,
        }


class TimeSummary(TypedDict):
    """A duration summary in seconds (p50/p99 are histogram bucket bounds)."""

    count: int
    p50: float
    p99: float
    max: float
    sum: float


class PoolStats(TypedDict):
    """What `Pool.stats()` returns. Every key is documented in README.md ("Stats")."""

    name: str
    # gauges
    size: int
    idle: int
    in_use: int
    parked: int  # kept between requests by a thread (Django's CONN_MAX_AGE), stealable
    waiting: int
    min_size: int
    max_size: int
    overflow: int
    # counters (since the pool was created)
    borrows: int
    timeouts: int
    rejected: int
    connections_created: int
    connections_closed: int
    connections_failed: int
    connections_lost: int
    leaks_detected: int
    leaks_reclaimed: int
    validations_run: int
    validations_skipped: int
    validations_failed: int
    resets: int
    # durations, seconds
    wait_time: TimeSummary
    hold_time: TimeSummary
    connect_time: TimeSummary
