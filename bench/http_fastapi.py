"""FastAPI end to end: poolkit_fastapi vs a hand-written psycopg_pool app vs connect-per-request.

Run: `.venv/bin/python -m bench.http_fastapi` (about 3 minutes). Each app is a uvicorn
process (one worker, pinned to CPU 0) serving the same route, `SELECT 1` plus one small
insert, with a pool of 8; wrk (or a bounded httpx client) pinned to CPU 1 drives it at
32 and 128 connections. Rounds interleave the apps so drift hits them alike; the table
shows medians over the rounds and ratios to the psycopg_pool app in the same rounds.
Uses $POOLKIT_BENCH_DSN, else an embedded server in .poolkit/bench-pgdata.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import psycopg
from fastapi import Depends, FastAPI, Request
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

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
from poolkit import PoolConfig, mask_conninfo
from poolkit_fastapi import Conn, PoolLifespan

POOL_SIZE = 8
CONCURRENCY = (32, 128)
TABLE = "bench_http_fastapi"
INSERT = f"INSERT INTO {TABLE} (app) VALUES (%s)"
# The apps read the server from here (not POOLKIT_*: from_env() would reject it).
DSN_VAR = "BENCH_HTTP_DSN"
APPS = {
    "poolkit_fastapi": "bench.http_fastapi:poolkit_app",
    "psycopg_pool (hand-written)": "bench.http_fastapi:psycopg_pool_app",
    "connect per request": "bench.http_fastapi:connect_app",
}
BASELINE = "psycopg_pool (hand-written)"
PACKAGES = ("fastapi", "starlette", "uvicorn", "uvloop", "httptools", "psycopg", "psycopg-pool")


def _dsn() -> str:
    return os.environ[DSN_VAR]


def _ping_route(app: FastAPI) -> None:
    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}


# -- (a) poolkit_fastapi ---------------------------------------------------------------


def poolkit_app() -> FastAPI:
    config = PoolConfig.from_url(_dsn(), min_size=POOL_SIZE, max_size=POOL_SIZE, name="bench")
    app = FastAPI(lifespan=PoolLifespan(config))
    _ping_route(app)

    @app.post("/bench")
    async def bench(conn: Conn) -> dict[str, bool]:
        await conn.execute("SELECT 1")
        await conn.execute(INSERT, ("poolkit",))
        return {"ok": True}

    return app


# -- (b) the hand-written psycopg_pool app: the usual lifespan + dependency -------------


@asynccontextmanager
async def _psycopg_pool_lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        _dsn(), min_size=POOL_SIZE, max_size=POOL_SIZE, open=False
    )
    await pool.open(wait=True)
    try:
        yield {"pool": pool}
    finally:
        await pool.close()


async def _psycopg_pool_conn(request: Request) -> AsyncIterator[AsyncConnection[Any]]:
    async with request.state.pool.connection() as conn:
        yield conn


def psycopg_pool_app() -> FastAPI:
    app = FastAPI(lifespan=_psycopg_pool_lifespan)
    _ping_route(app)

    # scope="function" like poolkit's Conn: both commit before the response is sent.
    @app.post("/bench")
    async def bench(
        conn: Annotated[AsyncConnection[Any], Depends(_psycopg_pool_conn, scope="function")],
    ) -> dict[str, bool]:
        await conn.execute("SELECT 1")
        await conn.execute(INSERT, ("psycopg_pool",))
        return {"ok": True}

    return app


# -- (c) a new connection per request ---------------------------------------------------


async def _new_conn() -> AsyncIterator[AsyncConnection[Any]]:
    async with await AsyncConnection.connect(_dsn()) as conn:
        yield conn


def connect_app() -> FastAPI:
    app = FastAPI()
    _ping_route(app)

    @app.post("/bench")
    async def bench(
        conn: Annotated[AsyncConnection[Any], Depends(_new_conn, scope="function")],
    ) -> dict[str, bool]:
        await conn.execute("SELECT 1")
        await conn.execute(INSERT, ("connect",))
        return {"ok": True}

    return app


# -- the run ----------------------------------------------------------------------------


def _server_dsn() -> str:
    dsn = os.environ.get("POOLKIT_BENCH_DSN")
    if dsn:
        return dsn
    from example_apps._embedded_pg import ensure_server

    with contextlib.redirect_stdout(sys.stderr):
        return ensure_server(Path(".poolkit/bench-pgdata"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_fastapi", description=__doc__)
    parser.add_argument("--duration", type=int, default=3, help="seconds per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="seconds before each one")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median shown)")
    args = parser.parse_args(argv)
    budget = len(APPS) * len(CONCURRENCY) * args.rounds * (args.duration + args.warmup + 0.5)
    print(f"# about {budget / 60:.1f} min of load, plus startup", file=sys.stderr, flush=True)

    dsn = _server_dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigserial PRIMARY KEY, app text)")
        conn.execute(f"TRUNCATE {TABLE}")
    env = {DSN_VAR: dsn}
    results: dict[tuple[str, int], list[Result]] = {}
    with contextlib.ExitStack() as stack:
        urls = {
            name: stack.enter_context(uvicorn_server(f, env, "/ping")) for name, f in APPS.items()
        }
        names = list(APPS)
        for round_no in range(args.rounds):
            for conns in CONCURRENCY:
                # Rotate the order every round so no app always runs first.
                for name in names[round_no % len(names) :] + names[: round_no % len(names)]:
                    url = urls[name] + "/bench"
                    load(url, conns, args.warmup)
                    result = load(url, conns, args.duration)
                    results.setdefault((name, conns), []).append(result)
                    print(
                        f"# round {round_no + 1} {name} @{conns}: {result.rps:.0f} req/s, "
                        f"p50 {fmt_ms(result.p50)} ms, p99 {fmt_ms(result.p99)} ms, "
                        f"{result.errors} errors",
                        file=sys.stderr,
                        flush=True,
                    )
                    time.sleep(0.2)
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()
    inserted = int(row[0]) if row else 0

    print(report(results, args, dsn, inserted))
    return 0


def report(
    results: dict[tuple[str, int], list[Result]], args: argparse.Namespace, dsn: str, inserted: int
) -> str:
    pin = pinning()
    lines = [
        f"FastAPI over HTTP, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()}; uvicorn 1 worker"
        f"{' on CPU 0' if pin else ''}, {load_tool()} 1 thread{' on CPU 1' if pin else ''}; "
        f"pool of {POOL_SIZE}; route = SELECT 1 + one insert; {args.rounds} interleaved rounds "
        f"of {args.duration} s. req/s, p50 and p99 are medians over the rounds; ratios are "
        "medians of per-round ratios to the psycopg_pool app (same round, seconds apart).",
        "",
        "| app | conns | req/s | p50 ms | p99 ms | errors | req/s vs psycopg_pool "
        "| p99 vs psycopg_pool | req/s range over rounds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for conns in CONCURRENCY:
        base = results[(BASELINE, conns)]
        for name in APPS:
            runs = results[(name, conns)]
            r = summarize(runs)
            lines.append(
                f"| {name} | {conns} | {r.rps:.0f} | {fmt_ms(r.p50)} | {fmt_ms(r.p99)} | "
                f"{r.errors} | {paired_ratio(runs, base)} | {paired_ratio(runs, base, 'p99')} | "
                f"{spread(runs)} |"
            )
    lines.append("")
    for conns in CONCURRENCY:
        pk = results[("poolkit_fastapi", conns)]
        cpr = results[("connect per request", conns)]
        lines.append(f"- poolkit_fastapi vs connect-per-request @{conns}: {paired_ratio(pk, cpr)}")
    lines += [
        "",
        f"{versions(*PACKAGES)}; server {mask_conninfo(dsn)}; {inserted} rows inserted.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
