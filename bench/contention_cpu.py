"""Where a contended sync borrow's client CPU goes: borrow, query and return, per pool.

Run: `.venv/bin/python -m bench.contention_cpu` (about a minute). bench.core reports the
client CPU per operation of 32 threads sharing a pool of 8 (`SELECT pg_sleep(0.002)`);
this splits it. Each thread adds up its own CPU time (`time.thread_time()`) around the
borrow (`__enter__` of `connection()`), the query and the return (`__exit__`); "other" is
the rest of the process's CPU time (the pool's background threads, the interpreter).
Blocking costs CPU too (the futex calls and the switch to another thread are charged to
the thread that blocks), so a borrow that waits in line costs more than an idle one.
Each round is a fresh process under `taskset` on one CPU; peers interleaved round by round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
from time import perf_counter, thread_time
from typing import Any

from bench._common import (
    bench_server,
    emit_result,
    markdown_table,
    pin_cpu,
    run_started_threads,
    run_worker,
    worker_dsns,
)
from bench.core import connect_kwargs, open_contention_pool_sync

MODULE = "bench.contention_cpu"
PEERS = ("poolkit", "psycopg_pool", "floor")
PARTS = ("borrow", "query", "return", "other", "total")


def _worker(spec: dict[str, Any]) -> dict[str, float]:
    dsn, _ = worker_dsns()
    size, nthreads, duration = spec["size"], spec["threads"], spec["duration"]
    # The pools and connection settings of bench.core's contention run, which this splits.
    pool = open_contention_pool_sync(spec["peer"], dsn, connect_kwargs(), size)
    sums = [[0.0, 0.0, 0.0, 0] for _ in range(nthreads)]
    start = threading.Event()
    end_at = [0.0]

    def work(i: int) -> None:
        acc = sums[i]
        start.wait()
        end = end_at[0]
        while perf_counter() < end:
            t0 = thread_time()
            block = pool.connection()
            conn = block.__enter__()
            t1 = thread_time()
            conn.execute("SELECT pg_sleep(0.002)")
            t2 = thread_time()
            block.__exit__(None, None, None)
            t3 = thread_time()
            acc[0] += t1 - t0
            acc[1] += t2 - t1
            acc[2] += t3 - t2
            acc[3] += 1

    cpu = run_started_threads(work, nthreads, duration, start, end_at)
    pool.close()
    ops = sum(int(a[3]) for a in sums) or 1
    parts = [sum(a[k] for a in sums) / ops * 1e6 for k in range(3)]
    total = cpu / ops * 1e6
    return dict(zip(PARTS, [*parts, total - sum(parts), total], strict=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=2.0, help="seconds per round and peer")
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--pool", type=int, default=8)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        emit_result(_worker(json.loads(args.spec)))
        return 0
    res: dict[str, list[dict[str, float]]] = {peer: [] for peer in PEERS}
    with bench_server() as server:
        for r in range(args.rounds):
            for peer in PEERS[r % len(PEERS) :] + PEERS[: r % len(PEERS)]:
                spec = {"peer": peer, "size": args.pool, "threads": args.threads,
                        "duration": args.duration}  # fmt: skip
                argv_w = ["--worker", "--spec", json.dumps(spec)]
                res[peer].append(
                    run_worker(MODULE, argv_w, server, pin=pin_cpu(), timeout=args.duration + 90)
                )
            print(f"# round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    base = res["psycopg_pool"]
    rows = []
    for peer in PEERS:
        cells = [peer]
        for part in PARTS:
            cells.append(f"{statistics.median(x[part] for x in res[peer]):.1f}")
        ratios = [a["total"] / b["total"] for a, b in zip(res[peer], base, strict=True)]
        cells.append(f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
        rows.append(cells)
    print(
        f"{args.threads} threads, pool of {args.pool}, {args.rounds} rounds of "
        f"{args.duration:g} s; client CPU µs per operation, median over rounds:\n"
    )
    print(markdown_table(["peer", *PARTS, "total x psycopg_pool"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
