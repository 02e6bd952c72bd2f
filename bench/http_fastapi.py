"""FastAPI end to end: poolkit's Conn/SyncConn against the inline psycopg_pool routes users write.

Run: `.venv/bin/python -m bench.http_fastapi` (about 6 minutes; `--quick` for a smoke run).
Three pairs, each route running `SELECT 1` on a pool of min=max=8:

- async, autocommit: `async with pool.connection()` inline on psycopg_pool's
  AsyncConnectionPool(autocommit) vs `conn: Conn` on a poolkit pool with autocommit;
- async, transactional: the same with autocommit off (psycopg_pool's block commits at its
  end, poolkit's Conn before the response);
- def: `with pool.connection()` inline in a `def` route on a sync ConnectionPool vs
  `conn: SyncConn`.

Each app is its own uvicorn process (one worker, pinned to CPU 0); wrk -t2 -c32 keep-alive,
pinned to CPU 1, drives it. Reps interleave the two apps of a pair (A B, then B A) so drift
of the shared machine hits both alike; the report gives each pair's per-rep ratios, their
median and min-max, and the server's CPU time per request (psutil, user+system).
Uses $POOLKIT_BENCH_DSN, else an embedded server in .poolkit/bench-pgdata.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from fastapi import FastAPI, Request
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from bench._http import (
    Result,
    Served,
    load,
    load_tool,
    machine,
    pin_backends,
    pinning,
    uvicorn_process,
    versions,
)
from poolkit import PoolConfig, mask_conninfo
from poolkit_fastapi import Conn, PoolLifespan, SyncConn

POOL_SIZE = 8
CONNS = 32
THREADS = 2
PATH = "/q"
# The apps read the server from here (not POOLKIT_*: from_env() would reject it).
DSN_VAR = "BENCH_HTTP_DSN"
PACKAGES = ("fastapi", "starlette", "uvicorn", "uvloop", "httptools", "psycopg", "psycopg-pool")


@dataclass(frozen=True)
class Pair:
    """A baseline app and the poolkit app that replaces it, compared rep by rep."""

    label: str
    baseline: str  # uvicorn factory
    poolkit: str
    target: float  # the ratio poolkit must reach


PAIRS = (
    Pair(
        "`async def`, autocommit: inline `async with pool.connection()` vs `conn: Conn`",
        "bench.http_fastapi:inline_async_autocommit",
        "bench.http_fastapi:poolkit_async_autocommit",
        1.0,
    ),
    Pair(
        "`async def`, transactional: inline `async with pool.connection()` vs `conn: Conn`",
        "bench.http_fastapi:inline_async_transaction",
        "bench.http_fastapi:poolkit_async_transaction",
        1.0,
    ),
    Pair(
        "`def`: inline `with pool.connection()` (sync pool) vs `conn: SyncConn`",
        "bench.http_fastapi:inline_sync",
        "bench.http_fastapi:poolkit_sync",
        0.95,
    ),
)


def _dsn() -> str:
    return os.environ[DSN_VAR]


def _ping_route(app: FastAPI) -> None:
    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}


# -- the baselines, as the psycopg docs write them -------------------------------------------


def _inline_async(autocommit: bool) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        kwargs = {"autocommit": True} if autocommit else {}
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            _dsn(), min_size=POOL_SIZE, max_size=POOL_SIZE, kwargs=kwargs, open=False
        )
        await pool.open(wait=True)
        try:
            yield {"pool": pool}
        finally:
            await pool.close()

    app = FastAPI(lifespan=lifespan)
    _ping_route(app)

    @app.get(PATH)
    async def q(request: Request) -> dict[str, bool]:
        async with request.state.pool.connection() as conn:
            await conn.execute("SELECT 1")
        return {"ok": True}

    return app


def inline_async_autocommit() -> FastAPI:
    return _inline_async(True)


def inline_async_transaction() -> FastAPI:
    return _inline_async(False)


def inline_sync() -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        pool: ConnectionPool[Any] = ConnectionPool(
            _dsn(), min_size=POOL_SIZE, max_size=POOL_SIZE, open=False
        )
        pool.open(wait=True)
        try:
            yield {"pool": pool}
        finally:
            pool.close()

    app = FastAPI(lifespan=lifespan)
    _ping_route(app)

    @app.get(PATH)
    def q(request: Request) -> dict[str, bool]:
        with request.state.pool.connection() as conn:
            conn.execute("SELECT 1")
        return {"ok": True}

    return app


# -- poolkit_fastapi -------------------------------------------------------------------------


def _config(**settings: Any) -> PoolConfig:
    return PoolConfig.from_url(
        _dsn(), min_size=POOL_SIZE, max_size=POOL_SIZE, name="bench", **settings
    )


def _poolkit_async(autocommit: bool) -> FastAPI:
    app = FastAPI(lifespan=PoolLifespan(_config(autocommit=autocommit)))
    _ping_route(app)

    @app.get(PATH)
    async def q(conn: Conn) -> dict[str, bool]:
        await conn.execute("SELECT 1")
        return {"ok": True}

    return app


def poolkit_async_autocommit() -> FastAPI:
    return _poolkit_async(True)


def poolkit_async_transaction() -> FastAPI:
    return _poolkit_async(False)


def poolkit_sync() -> FastAPI:
    app = FastAPI(lifespan=PoolLifespan(sync_pools=_config()))
    _ping_route(app)

    @app.get(PATH)
    def q(conn: SyncConn) -> dict[str, bool]:
        conn.execute("SELECT 1")
        return {"ok": True}

    return app


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Rep:
    """One measurement of one app: the load result and the server's CPU seconds meanwhile."""

    result: Result
    cpu: float

    @property
    def cpu_per_request(self) -> float:
        served = self.result.requests - self.result.errors
        return self.cpu / served if served else float("nan")


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def measure(served: Served, seconds: float, warmup: float, conns: int, dsn: str) -> Rep:
    url = served.url + PATH
    if warmup:
        load(url, conns, warmup, "GET", threads=THREADS)
    pin_backends(dsn, [served.pid])
    before = _cpu(served.pid)
    result = load(url, conns, seconds, "GET", threads=THREADS)
    return Rep(result, _cpu(served.pid) - before)


def _server_dsn() -> str:
    dsn = os.environ.get("POOLKIT_BENCH_DSN")
    if dsn:
        return dsn
    from example_apps._embedded_pg import ensure_server

    with contextlib.redirect_stdout(sys.stderr):
        return ensure_server(Path(".poolkit/bench-pgdata"))


def run(
    dsn: str,
    reps: int,
    seconds: float,
    warmup: float,
    conns: int = CONNS,
    pairs: Sequence[Pair] = PAIRS,
) -> dict[str, list[tuple[Rep, Rep]]]:
    """For each pair label, `reps` (baseline, poolkit) measurements, interleaved."""
    env = {DSN_VAR: dsn}
    out: dict[str, list[tuple[Rep, Rep]]] = {p.label: [] for p in pairs}
    # One pair's servers at a time: the idle apps' pools would not cost much, but their
    # housekeeping would still be noise nobody needs.
    for pair in pairs:
        with (
            uvicorn_process(pair.baseline, env, "/ping") as base,
            uvicorn_process(pair.poolkit, env, "/ping") as pk,
        ):
            for rep in range(reps):
                order = [("baseline", base), ("poolkit", pk)]
                if rep % 2:
                    order.reverse()
                got: dict[str, Rep] = {}
                for name, served in order:
                    got[name] = measure(served, seconds, warmup, conns, dsn)
                    time.sleep(0.2)
                out[pair.label].append((got["baseline"], got["poolkit"]))
                b, p = got["baseline"], got["poolkit"]
                print(
                    f"# {pair.poolkit.split(':')[1]} rep {rep + 1}: baseline "
                    f"{b.result.rps:.0f} req/s, poolkit {p.result.rps:.0f} req/s, ratio "
                    f"{_ratio(p, b):.2f}; errors {b.result.errors}/{p.result.errors}",
                    file=sys.stderr,
                    flush=True,
                )
    return out


def _ratio(p: Rep, b: Rep) -> float:
    return p.result.rps / b.result.rps if b.result.rps else float("nan")


def report(
    results: dict[str, list[tuple[Rep, Rep]]],
    args: argparse.Namespace,
    dsn: str,
    pairs: Sequence[Pair] = PAIRS,
) -> str:
    pin = pinning()
    lines = [
        f"FastAPI over HTTP, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()}; uvicorn 1 "
        f"worker{' on CPU 0' if pin else ''}; {load_tool()} -t{THREADS} -c{args.conns} "
        f"keep-alive{' on CPU 1' if pin else ''}; pool min=max={POOL_SIZE}"
        f"{'; PostgreSQL backends on CPU 1' if pin else ''}; route = SELECT 1; "
        f"{args.reps} interleaved reps of {args.duration:g} s (after {args.warmup:g} s warm-up)"
        ". Ratio = poolkit req/s / baseline req/s in the same rep; median (min-max) over reps.",
        "",
        "| pair | baseline req/s | poolkit req/s | ratio median (min-max) | target | per-rep "
        "ratios | server CPU/req baseline | poolkit | errors |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    stalled = 0
    for pair in pairs:
        every = results[pair.label]
        # A rep where either server answered nothing says the machine stalled, not
        # which app is faster: left out of every figure, and counted below.
        reps = [(b, p) for b, p in every if b.result.rps and p.result.rps] or every
        stalled += len(every) - len(reps)
        ratios = [_ratio(p, b) for b, p in reps]
        base_rps = statistics.median(b.result.rps for b, _ in reps)
        pk_rps = statistics.median(p.result.rps for _, p in reps)
        base_cpu = statistics.median(b.cpu_per_request for b, _ in reps)
        pk_cpu = statistics.median(p.cpu_per_request for _, p in reps)
        errors = sum(b.result.errors + p.result.errors for b, p in reps)
        lines.append(
            f"| {pair.label} | {base_rps:.0f} | {pk_rps:.0f} | "
            f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | "
            f">= {pair.target:.2f} | {' '.join(f'{r:.2f}' for r in ratios)} | "
            f"{base_cpu * 1e6:.0f} µs | {pk_cpu * 1e6:.0f} µs ({(pk_cpu - base_cpu) * 1e6:+.0f})"
            f" | {errors} |"
        )
    if stalled:
        lines += ["", f"{stalled} rep(s) left out: a server answered no request in it."]
    lines += ["", f"{versions(*PACKAGES)}; server {mask_conninfo(dsn)}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_fastapi", description=__doc__)
    parser.add_argument("--reps", type=int, default=5, help="interleaved reps per pair")
    parser.add_argument("--duration", type=float, default=8, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of load before each")
    parser.add_argument("--conns", type=int, default=CONNS, help="keep-alive connections")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 rep of 1 s, no warm-up, 8 connections"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=[p.poolkit.split(":")[1] for p in PAIRS],
        help="run only this pair (repeatable)",
    )
    args = parser.parse_args(argv)
    pairs = [p for p in PAIRS if not args.only or p.poolkit.split(":")[1] in args.only]
    if args.quick:
        args.reps, args.duration, args.warmup, args.conns = 1, 1.0, 0.0, 8
    # A plain SIGTERM would skip the finally blocks that stop the uvicorn servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    budget = len(pairs) * 2 * args.reps * (args.duration + args.warmup + 0.3)
    print(f"# about {budget / 60:.1f} min of load, plus startup", file=sys.stderr, flush=True)
    dsn = _server_dsn()
    load_before = os.getloadavg()
    results = run(dsn, args.reps, args.duration, args.warmup, args.conns, pairs)
    print(report(results, args, dsn, pairs))
    # The machine is shared: say how busy it was, so a reader can weigh the spread.
    print(
        f"Load average (1 min) {load_before[0]:.1f} before the run, {os.getloadavg()[0]:.1f} "
        f"after, on {os.cpu_count()} CPUs."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
