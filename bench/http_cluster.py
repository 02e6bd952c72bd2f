"""Read-heavy HTTP throughput: reads on a replica (ClusterPool) against the primary alone.

Run: `.venv/bin/python -m bench.http_cluster` (about 1.5 minutes). Starts a primary and a
streaming standby on loopback (tests/_replication.py), fills a small table, then serves
the same read route (one aggregate over 2k of 20k rows) from three uvicorn apps (one worker,
pinned to CPU 0 when taskset is there): a ClusterPool over primary + replica whose
`ReadConn` goes to the replica; the same ClusterPool code over the primary alone (reads
fall back to it); and a plain single-server pool with `Conn` on the primary (the cost of
the cluster layer). Rounds interleave the apps; medians and per-round ratios are shown.
On a 2-core machine both servers, the app and the load generator share the same cores:
this measures correctness and overhead, not scaling.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from fastapi import FastAPI

from bench._http import (
    Result,
    fmt_ms,
    load,
    load_tool,
    machine,
    paired_ratio,
    pinning,
    spread,
    summarize,
    uvicorn_server,
    versions,
)
from poolkit import AsyncClusterPool, PoolConfig
from poolkit_fastapi import ClusterLifespan, Conn, PoolLifespan, ReadConn

POOL_SIZE = 8
CONNS = 32
TABLE = "bench_cluster_items"
READ = f"SELECT count(*), sum(length(label)), max(id) FROM {TABLE} WHERE id <= 2000"
DSNS_VAR = "BENCH_CLUSTER_DSNS"
APPS = {
    "ClusterPool, reads on the replica": "bench.http_cluster:replica_app",
    "ClusterPool, primary only": "bench.http_cluster:primary_only_app",
    "plain pool on the primary": "bench.http_cluster:plain_app",
}
BASELINE = "ClusterPool, primary only"
PACKAGES = ("fastapi", "uvicorn", "psycopg", "psycopg-pool")


def _dsns() -> list[str]:
    dsns: list[str] = json.loads(os.environ[DSNS_VAR])
    return dsns


def _ping(app: FastAPI) -> None:
    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}


def _cluster_app(dsns: list[str]) -> FastAPI:
    cluster: AsyncClusterPool[Any] = AsyncClusterPool(
        dsns, name="bench", min_size=POOL_SIZE, max_size=POOL_SIZE
    )
    app = FastAPI(lifespan=ClusterLifespan(cluster))
    _ping(app)

    @app.get("/read")
    async def read(conn: ReadConn) -> dict[str, Any]:
        row = await (await conn.execute(READ)).fetchone()  # type: ignore[arg-type]
        return {"n": row[0] if row else None, "port": conn.info.port}

    return app


def replica_app() -> FastAPI:
    return _cluster_app(_dsns())


def primary_only_app() -> FastAPI:
    return _cluster_app(_dsns()[:1])


def plain_app() -> FastAPI:
    config = PoolConfig.from_url(_dsns()[0], min_size=POOL_SIZE, max_size=POOL_SIZE, name="bench")
    app = FastAPI(lifespan=PoolLifespan(config))
    _ping(app)

    @app.get("/read")
    async def read(conn: Conn) -> dict[str, Any]:
        row = await (await conn.execute(READ)).fetchone()  # type: ignore[arg-type]
        return {"n": row[0] if row else None, "port": conn.info.port}

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_cluster", description=__doc__)
    parser.add_argument("--duration", type=int, default=3, help="seconds per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="seconds before each one")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median shown)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests._replication import Replication

    root = Path(tempfile.mkdtemp(prefix="poolkit-bench-repl-"))
    pair = Replication(root)
    try:
        with psycopg.connect(pair.primary.dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
            conn.execute(f"CREATE TABLE {TABLE} (id serial PRIMARY KEY, label text)")
            conn.execute(
                f"INSERT INTO {TABLE} (label) SELECT md5(i::text) FROM generate_series(1, 20000) i"
            )
        pair.repair()  # the standby has replayed the table
        env = {DSNS_VAR: json.dumps(pair.dsns)}
        results: dict[str, list[Result]] = {}
        ports: dict[str, int] = {}
        with contextlib.ExitStack() as stack:
            urls = {
                n: stack.enter_context(uvicorn_server(f, env, "/ping")) for n, f in APPS.items()
            }
            import httpx

            for name, url in urls.items():
                ports[name] = httpx.get(url + "/read").json()["port"]
            names = list(APPS)
            for round_no in range(args.rounds):
                for name in names[round_no % len(names) :] + names[: round_no % len(names)]:
                    load(urls[name] + "/read", CONNS, args.warmup, method="GET")
                    result = load(urls[name] + "/read", CONNS, args.duration, method="GET")
                    results.setdefault(name, []).append(result)
                    print(
                        f"# round {round_no + 1} {name}: {result.rps:.0f} req/s, "
                        f"p50 {fmt_ms(result.p50)} ms, p99 {fmt_ms(result.p99)} ms, "
                        f"{result.errors} errors",
                        file=sys.stderr,
                        flush=True,
                    )
                    time.sleep(0.2)
        print(report(results, ports, pair, args))
    finally:
        pair.cleanup()
    return 0


def report(results: dict[str, list[Result]], ports: dict[str, int], pair: Any, args: Any) -> str:
    pin = pinning()
    roles = {pair.primary.port: "primary", pair.standby.port: "replica"}
    lines = [
        f"Read-heavy HTTP, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()}; uvicorn 1 worker"
        f"{' on CPU 0' if pin else ''}, {load_tool()}{' on CPU 1' if pin else ''}, {CONNS} "
        f"connections; pool of {POOL_SIZE} per host; route = `{READ}`; both servers "
        f"on the same machine; {args.rounds} interleaved rounds of {args.duration} s. Medians "
        "over rounds; ratios are medians of per-round ratios to the primary-only ClusterPool.",
        "",
        "| app | reads served by | req/s | p50 ms | p99 ms | errors | req/s vs primary only "
        "| req/s range |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = results[BASELINE]
    for name in APPS:
        runs = results[name]
        r = summarize(runs)
        lines.append(
            f"| {name} | {roles.get(ports[name], '?')} | {r.rps:.0f} | {fmt_ms(r.p50)} | "
            f"{fmt_ms(r.p99)} | {r.errors} | {paired_ratio(runs, base)} | {spread(runs)} |"
        )
    lines += ["", versions(*PACKAGES)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
