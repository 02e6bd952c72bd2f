"""Failover timings of ClusterPool with writers and readers running, on a real primary + standby.

Run: `.venv/bin/python -m bench.cluster_failover --runs 3` (about 10 s a run). Each run:
4 writer threads insert rows (one per transaction, through `connection()`), 4 reader threads
read through `connection(read_only=True)`; then (a) the standby is stopped and restarted,
then (b) the primary is stopped and the standby promoted. Reported per run: seconds from
the promote command (the old primary is down by then) and from the end of the promotion
(pg_ctl promote -w returned and the server left recovery) to the first committed write;
writes acknowledged vs rows found on the new primary (lost must be 0); read failures that
started more than 1 s after the replica stopped (must be 0).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from poolkit import ClusterPool

WRITERS = READERS = 4


def one_run(pair: Any) -> dict[str, Any]:
    pair.repair()
    with psycopg.connect(pair.primary.dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS pk_failover")
        conn.execute("CREATE TABLE pk_failover (id bigint PRIMARY KEY)")
    pair.repair()  # the standby has the table before readers ask it
    stop = threading.Event()
    acked: list[int] = []
    write_ok_at: list[float] = []
    read_fail_at: list[float] = []
    next_id = iter(range(1, 10**9))
    lock = threading.Lock()
    cluster: ClusterPool[Any] = ClusterPool(pair.dsns, min_size=2, max_size=8, timeout=10)
    cluster.open()
    cluster.wait(15)

    def writer() -> None:
        while not stop.is_set():
            with lock:
                i = next(next_id)
            try:
                with cluster.connection() as conn:
                    conn.execute("INSERT INTO pk_failover VALUES (%s)", (i,))
            except Exception:
                time.sleep(0.01)
                continue
            with lock:
                acked.append(i)
                write_ok_at.append(time.monotonic())

    def reader() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                with cluster.connection(read_only=True) as conn:
                    conn.execute("SELECT count(*) FROM pk_failover")
            except Exception:
                read_fail_at.append(started)
                time.sleep(0.01)

    threads = [threading.Thread(target=writer) for _ in range(WRITERS)]
    threads += [threading.Thread(target=reader) for _ in range(READERS)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        replica_stopped = time.monotonic()
        pair.stop_standby()
        time.sleep(2.0)
        pair.standby.start()
        time.sleep(1.5)
        late_read_failures = sum(1 for t in read_fail_at if replica_stopped + 1.0 <= t)
        # Asynchronous replication: only a standby that streams gets every commit.
        pair._wait_streaming(pair.primary)
        pair.failover()
        promoted = pair.promoted_at
        deadline = promoted + 15
        while time.monotonic() < deadline:
            with lock:
                if any(t > promoted for t in write_ok_at):
                    break
            time.sleep(0.005)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
        stats = cluster.stats()
        cluster.close(timeout=5)
    with lock:
        after = [t for t in write_ok_at if t > pair.promote_started]
    with psycopg.connect(pair.standby.dsn, autocommit=True) as conn:  # the new primary
        found = {r[0] for r in conn.execute("SELECT id FROM pk_failover").fetchall()}
    lost = [i for i in acked if i not in found]
    return {
        # Negative when the cluster saw the promotion before the fixture's poll did.
        "first_write_after_promotion": max(0.0, min(after) - promoted) if after else None,
        "first_write_after_promote_command": min(after) - pair.promote_started if after else None,
        "promotion_took": pair.promoted_at - pair.promote_started,
        "acked": len(acked),
        "lost": len(lost),
        "late_read_failures": late_read_failures,
        "read_failures": len(read_fail_at),
        "max_size_ok": all(h["size"] <= 8 for h in stats["hosts"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster_failover", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests._replication import Replication

    pair = Replication(Path(tempfile.mkdtemp(prefix="poolkit-failover-")))
    results = []
    try:
        for n in range(args.runs):
            r = one_run(pair)
            results.append(r)
            print(f"# run {n + 1}: {r}", file=sys.stderr, flush=True)
    finally:
        pair.cleanup()
    print(
        "| run | promotion took (s) | first write after the promote command (s) | "
        "after the promotion finished (s) | writes acked | acked lost | read failures "
        "(all / started >1 s after the replica stopped) | sizes within max |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for n, r in enumerate(results, 1):
        cmd, first = r["first_write_after_promote_command"], r["first_write_after_promotion"]
        shown = "-" if first is None else f"{cmd:.2f} | {first:.2f}"
        reads = f"{r['read_failures']} / {r['late_read_failures']}"
        print(
            f"| {n} | {r['promotion_took']:.2f} | {shown} | {r['acked']} | {r['lost']} | "
            f"{reads} | {r['max_size_ok']} |"
        )
    times = [r["first_write_after_promote_command"] for r in results]
    if None not in times:
        print(
            f"\nfirst write after the promote command: median {statistics.median(times):.2f} s, "
            f"min {min(times):.2f}, max {max(times):.2f} over {len(times)} runs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
