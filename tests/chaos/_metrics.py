"""Read the few figures the chaos report needs out of a Prometheus text page."""

from __future__ import annotations

import math
import re

WAIT_METRIC = "db_client_connection_wait_time_seconds"
POOL = "default"  # the pool the example apps' requests borrow from

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group("name") == name:
            labels = dict(_LABEL.findall(m.group("labels") or ""))
            out.append((labels, float(m.group("value"))))
    return out


def prom_quantile(text: str, histogram: str, q: float, pool: str = POOL) -> float | None:
    """Upper bound of the bucket holding quantile `q` of `histogram` for `pool`."""
    buckets = sorted(
        (math.inf if labels["le"] == "+Inf" else float(labels["le"]), value)
        for labels, value in samples(text, histogram + "_bucket")
        if labels.get("pool_name") == pool
    )
    if not buckets or buckets[-1][1] == 0:
        return None
    want = q * buckets[-1][1]
    return next(bound for bound, count in buckets if count >= want)


def max_counter(texts: list[str], name: str, pool: str = POOL) -> float:
    """The largest value of counter `name` for `pool` across scrapes (workers differ)."""
    values = [v for t in texts for labels, v in samples(t, name) if labels.get("pool_name") == pool]
    return max(values, default=0.0)
