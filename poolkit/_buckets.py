"""Exported histogram buckets: cumulative counts at a coarser step than poolkit keeps."""

from __future__ import annotations

from ._stats import Histogram

__all__ = ["POOL_BUCKET_STEP", "ROUTE_BUCKET_STEP", "cumulative"]

# Exported bucket bounds are a subset of poolkit's (four per doubling), so cumulative
# counts stay exact: one per doubling (10 µs .. 84 s) for the pool-wide histograms, one
# per quadrupling for the per-route ones, whose series count is multiplied by the routes.
POOL_BUCKET_STEP = 4
ROUTE_BUCKET_STEP = 8


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
