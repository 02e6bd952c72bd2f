"""What a chaos run must show: acknowledged writes kept once, failures explained and bounded."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# A load-generator record: [id, client, start, end, status, body-if-failed].
ID, CLIENT, T0, T1, STATUS, BODY = range(6)


def short(body: str, limit: int = 120) -> str:
    """A response body on one line, HTML tags dropped (Django's error page is HTML)."""
    return " ".join(re.sub(r"<[^>]*>", " ", body).split())[:limit]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Analysis:
    """The verdict on one run's requests against the rows found in the database."""

    requests: int
    acknowledged: int
    failed: int
    failed_by_status: dict[str, int]
    lost: list[str]
    duplicates: dict[str, int]
    phantoms: list[str]
    refused_but_written: list[str]
    transport_errors: list[list[Any]]
    outside_window: list[list[Any]]
    recovery_s: float | None
    ok_before_fault: int
    ok_after_recovery: int
    latency_p99: float | None
    latency_max: float | None
    sample_failures: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Every broken promise, in words; empty when the run kept them all."""
        out = []
        if self.lost:
            out.append(
                f"{len(self.lost)} acknowledged writes are not in the database: {self.lost[:5]}"
            )
        if self.duplicates:
            sample = dict(list(self.duplicates.items())[:5])
            out.append(f"{len(self.duplicates)} ids written more than once: {sample}")
        if self.phantoms:
            out.append(f"{len(self.phantoms)} rows were never requested: {self.phantoms[:5]}")
        if self.refused_but_written:
            out.append(
                f"{len(self.refused_but_written)} writes answered 503 ('nothing was written') "
                f"are in the database: {self.refused_but_written[:5]}"
            )
        if self.transport_errors:
            sample = [short(r[BODY]) for r in self.transport_errors[:3]]
            out.append(
                f"{len(self.transport_errors)} requests got no HTTP answer (hang, reset): {sample}"
            )
        if self.outside_window:
            sample = [f"{r[STATUS]} {short(r[BODY])!r}" for r in self.outside_window[:3]]
            out.append(
                f"{len(self.outside_window)} failures outside the fault window + recovery bound:"
                f" {sample}"
            )
        return out


def analyse(
    records: list[list[Any]],
    db_counts: dict[str, int],
    fault_start: float,
    fault_end: float,
    recovery_bound: float,
) -> Analysis:
    """Judge `records` (every request of every generator) against `db_counts` (id -> rows)."""
    ok = [r for r in records if 200 <= r[STATUS] < 300]
    bad = [r for r in records if not 200 <= r[STATUS] < 300]
    sent = {r[ID] for r in records}
    acked = {r[ID] for r in ok}
    lost = sorted(acked - db_counts.keys())
    duplicates = {i: n for i, n in db_counts.items() if n > 1}
    phantoms = sorted(db_counts.keys() - sent)
    refused_but_written = sorted(r[ID] for r in bad if r[STATUS] == 503 and r[ID] in db_counts)
    transport = [r for r in bad if not 500 <= r[STATUS] <= 599]
    # A failure belongs to the fault if it was in flight while the fault lasted or started
    # within the recovery bound after it.
    outside = [r for r in bad if r[T1] < fault_start or r[T0] > fault_end + recovery_bound]
    # Recovered: the first acknowledged write that started after the fault ended and after
    # the last failure began; from then on every request succeeded.
    since = max([fault_end, *(r[T0] for r in bad)])
    first_ok = min((r[T1] for r in ok if r[T0] >= since), default=None)
    recovery = None if first_ok is None else first_ok - fault_end
    ok_after = sum(1 for r in ok if r[T0] >= since)
    latencies = [r[T1] - r[T0] for r in records]
    by_status = Counter(str(r[STATUS]) for r in bad)
    samples = sorted({f"{r[STATUS]}: {short(r[BODY], 160)}" for r in bad})[:5]
    return Analysis(
        requests=len(records),
        acknowledged=len(acked),
        failed=len(bad),
        failed_by_status=dict(by_status),
        lost=lost,
        duplicates=duplicates,
        phantoms=phantoms,
        refused_but_written=refused_but_written,
        transport_errors=transport,
        outside_window=outside,
        recovery_s=recovery,
        ok_before_fault=sum(1 for r in ok if r[T1] < fault_start),
        ok_after_recovery=ok_after,
        latency_p99=percentile(latencies, 0.99),
        latency_max=max(latencies, default=None),
        sample_failures=samples,
    )


def starved_clients(records: list[list[Any]], clients: int) -> list[int]:
    """Client indexes of one generator that never got a 2xx."""
    served = {r[CLIENT] for r in records if 200 <= r[STATUS] < 300}
    return [c for c in range(clients) if c not in served]
