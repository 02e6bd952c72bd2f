"""Core pool benchmark: poolkit vs psycopg_pool vs SQLAlchemy vs a minimal pool, in one run.

Run `python -m bench.core` (see docs/bench-core.md). The orchestrator starts the server,
then re-runs this module as worker subprocesses: single-thread ones under `taskset`, one
subprocess per contention round so every peer starts from a clean process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import json
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

from bench._common import (
    AsyncFloorPool,
    FloorPool,
    bench_server,
    emit_result,
    fmt,
    fmt_ratio,
    fmt_spread,
    header_lines,
    machine_info,
    markdown_table,
    median,
    paired_ratios,
    percentile,
    pin_backends,
    pin_cpu,
    run_started_threads,
    run_worker,
    worker_dsns,
    write_results,
)

MODULE = "bench.core"
SIZE = 4  # pool size for single-thread runs (one connection in use at a time)
PACE_GAP = 0.002  # seconds a connection sits idle between borrows in the "paced" column
CONTENTION_QUERY = "SELECT pg_sleep(0.002)"

SyncLoop = Callable[[int], float]  # n iterations -> seconds
AsyncLoop = Callable[[int], Awaitable[float]]


def connect_kwargs() -> dict[str, Any]:
    # Autocommit everywhere: one round trip per SELECT, no BEGIN/COMMIT in the figures.
    # The application name lets a worker find (and pin) its own backends.
    return {"autocommit": True, "application_name": f"poolkit-bench-{os.getpid()}"}


# -- loops: one per API style, identical harness for every peer -----------------------------


def _cm_loop(pool: Any, query: str | None) -> SyncLoop:
    def run(n: int) -> float:
        t0 = perf_counter()
        if query is None:
            for _ in range(n):
                with pool.connection():
                    pass
        else:
            for _ in range(n):
                with pool.connection() as conn:
                    conn.execute(query)
        return perf_counter() - t0

    return run


def _getput_loop(pool: Any, query: str | None) -> SyncLoop:
    def run(n: int) -> float:
        get, put = pool.getconn, pool.putconn
        t0 = perf_counter()
        if query is None:
            for _ in range(n):
                put(get())
        else:
            for _ in range(n):
                conn = get()
                conn.execute(query)
                put(conn)
        return perf_counter() - t0

    return run


def _sqla_loop(pool: Any, query: str | None) -> SyncLoop:
    def run(n: int) -> float:
        connect = pool.connect
        t0 = perf_counter()
        if query is None:
            for _ in range(n):
                connect().close()
        else:
            for _ in range(n):
                fairy = connect()
                fairy.driver_connection.execute(query)
                fairy.close()
        return perf_counter() - t0

    return run


def _held_loop(conn: Any, query: str) -> SyncLoop:
    def run(n: int) -> float:
        t0 = perf_counter()
        for _ in range(n):
            conn.execute(query)
        return perf_counter() - t0

    return run


def _paced(one_borrow: SyncLoop) -> SyncLoop:
    """Time only the borrows, each after the connection sat idle for PACE_GAP."""

    def run(n: int) -> float:
        total = 0.0
        for _ in range(n):
            time.sleep(PACE_GAP)
            total += one_borrow(1)
        return total

    return run


def _acm_loop(pool: Any, query: str | None) -> AsyncLoop:
    async def run(n: int) -> float:
        t0 = perf_counter()
        if query is None:
            for _ in range(n):
                async with pool.connection():
                    pass
        else:
            for _ in range(n):
                async with pool.connection() as conn:
                    await conn.execute(query)
        return perf_counter() - t0

    return run


def _agetput_loop(pool: Any, query: str | None, sync_put: bool = False) -> AsyncLoop:
    async def run(n: int) -> float:
        get, put = pool.getconn, pool.putconn
        t0 = perf_counter()
        for _ in range(n):
            conn = await get()
            if query is not None:
                await conn.execute(query)
            if sync_put:
                put(conn)
            else:
                await put(conn)
        return perf_counter() - t0

    return run


def _aheld_loop(conn: Any, query: str) -> AsyncLoop:
    async def run(n: int) -> float:
        t0 = perf_counter()
        for _ in range(n):
            await conn.execute(query)
        return perf_counter() - t0

    return run


def _sizes(per_op: dict[str, float], target: float, hi: int) -> dict[str, int]:
    return {k: max(20, min(hi, int(target / max(v, 1e-7)))) for k, v in per_op.items()}


def _rotate(items: list[Any], r: int) -> list[Any]:
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


def _run_sync_cases(cases: dict[str, SyncLoop], rounds: int, target: float) -> dict[str, Any]:
    for fn in cases.values():
        fn(30)  # warm up: code paths, lazily created connections
    pilot = {k: fn(100) / 100 for k, fn in cases.items()}
    ns = _sizes(pilot, target, 200_000)
    keys = list(cases)
    out: dict[str, list[float]] = {k: [] for k in keys}
    gc.collect()
    for r in range(rounds):
        for k in _rotate(keys, r):
            out[k].append(cases[k](ns[k]) / ns[k] * 1e6)
    return {"us": out, "n": ns}


async def _run_async_cases(
    cases: dict[str, AsyncLoop], rounds: int, target: float
) -> dict[str, Any]:
    for fn in cases.values():
        await fn(30)
    pilot = {k: await fn(100) / 100 for k, fn in cases.items()}
    ns = _sizes(pilot, target, 200_000)
    keys = list(cases)
    out: dict[str, list[float]] = {k: [] for k in keys}
    gc.collect()
    for r in range(rounds):
        for k in _rotate(keys, r):
            out[k].append(await cases[k](ns[k]) / ns[k] * 1e6)
    return {"us": out, "n": ns}


# -- workers ---------------------------------------------------------------------------------


def _open_sync(stack: contextlib.ExitStack, cls: type, dsn: str, **kw: Any) -> Any:
    pool = cls(dsn, min_size=SIZE, max_size=SIZE, open=False, timeout=30.0, **kw)
    pool.open(wait=True)
    stack.callback(pool.close)
    return pool


def _sqla_pool(dsn: str, kw: dict[str, Any], size: int, *, pre_ping: bool = False) -> Any:
    import psycopg
    from sqlalchemy import create_engine
    from sqlalchemy.pool import QueuePool

    def creator() -> Any:
        return psycopg.connect(dsn, **kw)

    if not pre_ping:
        return QueuePool(creator, pool_size=size, max_overflow=0, timeout=60.0)
    # pre_ping needs a dialect to know how to ping: go through an engine.
    engine = create_engine(
        "postgresql+psycopg://", creator=creator, poolclass=QueuePool, pool_size=size,
        max_overflow=0, pool_pre_ping=True,
    )  # fmt: skip
    return engine.pool


def _worker_single_sync(spec: dict[str, Any]) -> dict[str, Any]:
    import psycopg
    from psycopg_pool import ConnectionPool

    from poolkit import Pool

    dsn, unix_dsn = worker_dsns()
    kw = connect_kwargs()
    with contextlib.ExitStack() as stack:
        pk = _open_sync(stack, Pool, dsn, kwargs=kw, name="poolkit")
        pk_leak = _open_sync(stack, Pool, dsn, kwargs=kw, name="poolkit-leak", leak_threshold=5)
        pk_noreset = _open_sync(stack, Pool, dsn, kwargs=kw, name="poolkit-noreset", reset="none")
        pp = _open_sync(stack, ConnectionPool, dsn, kwargs=kw, name="psycopg_pool")
        sa = _sqla_pool(dsn, kw, SIZE)
        stack.callback(sa.dispose)
        floor = FloorPool([psycopg.connect(dsn, **kw) for _ in range(SIZE)])
        stack.callback(floor.close)
        held = stack.enter_context(psycopg.connect(dsn, **kw))
        cases: dict[str, SyncLoop] = {}
        for q, mode in ((None, "noop"), ("SELECT 1", "select")):
            cases[f"pk_cm/{mode}"] = _cm_loop(pk, q)
            cases[f"pk_get/{mode}"] = _getput_loop(pk, q)
            cases[f"pk_leak_cm/{mode}"] = _cm_loop(pk_leak, q)
            cases[f"pk_noreset_cm/{mode}"] = _cm_loop(pk_noreset, q)
            cases[f"pp_cm/{mode}"] = _cm_loop(pp, q)
            cases[f"pp_get/{mode}"] = _getput_loop(pp, q)
            cases[f"sa/{mode}"] = _sqla_loop(sa, q)
            cases[f"floor/{mode}"] = _cm_loop(floor, q)
        cases["held/select"] = _held_loop(held, "SELECT 1")
        if unix_dsn:
            held_unix = stack.enter_context(psycopg.connect(unix_dsn, **kw))
            cases["held_unix/select"] = _held_loop(held_unix, "SELECT 1")
        for fn in cases.values():
            fn(5)  # SQLAlchemy connects lazily: every backend exists before pinning
        pinned = pin_backends(held, kw["application_name"], spec["cpu"])
        result = _run_sync_cases(cases, spec["rounds"], spec["target"])
        result["pinned"] = pinned
        result["pk_stats"] = {k: v for k, v in pk.stats().items() if isinstance(v, int)}
        return result


def _worker_single_async(spec: dict[str, Any]) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        import psycopg
        from psycopg_pool import AsyncConnectionPool

        from poolkit import AsyncPool

        dsn, _ = worker_dsns()
        kw = connect_kwargs()
        async with contextlib.AsyncExitStack() as stack:

            async def opened(cls: type, **extra: Any) -> Any:
                pool = cls(dsn, min_size=SIZE, max_size=SIZE, open=False, timeout=30.0, **extra)
                await pool.open(wait=True)
                stack.push_async_callback(pool.close)
                return pool

            pk = await opened(AsyncPool, kwargs=kw, name="poolkit")
            pk_leak = await opened(AsyncPool, kwargs=kw, name="poolkit-leak", leak_threshold=5)
            pk_noreset = await opened(AsyncPool, kwargs=kw, name="poolkit-noreset", reset="none")
            pp = await opened(AsyncConnectionPool, kwargs=kw, name="psycopg_pool")
            conns = [await psycopg.AsyncConnection.connect(dsn, **kw) for _ in range(SIZE)]
            floor = AsyncFloorPool(conns)
            stack.push_async_callback(floor.close)
            held = await psycopg.AsyncConnection.connect(dsn, **kw)
            stack.push_async_callback(held.close)
            cases: dict[str, AsyncLoop] = {}
            for q, mode in ((None, "noop"), ("SELECT 1", "select")):
                cases[f"pk_cm/{mode}"] = _acm_loop(pk, q)
                cases[f"pk_get/{mode}"] = _agetput_loop(pk, q)
                cases[f"pk_leak_cm/{mode}"] = _acm_loop(pk_leak, q)
                cases[f"pk_noreset_cm/{mode}"] = _acm_loop(pk_noreset, q)
                cases[f"pp_cm/{mode}"] = _acm_loop(pp, q)
                cases[f"pp_get/{mode}"] = _agetput_loop(pp, q)
                cases[f"floor/{mode}"] = _acm_loop(floor, q)
            cases["held/select"] = _aheld_loop(held, "SELECT 1")
            with psycopg.connect(dsn, **kw) as probe:
                pinned = pin_backends(probe, kw["application_name"], spec["cpu"])
            result = await _run_async_cases(cases, spec["rounds"], spec["target"])
            result["pinned"] = pinned
            return result

    return asyncio.run(main())


def _worker_validated(spec: dict[str, Any]) -> dict[str, Any]:
    import psycopg
    from psycopg_pool import ConnectionPool

    from poolkit import Pool

    dsn, _ = worker_dsns()
    kw = connect_kwargs()
    with contextlib.ExitStack() as stack:
        pools = {
            "pp_check": _open_sync(
                stack, ConnectionPool, dsn, kwargs=kw, check=ConnectionPool.check_connection
            ),
            "pk": _open_sync(stack, Pool, dsn, kwargs=kw),
            "pk_always": _open_sync(stack, Pool, dsn, kwargs=kw, validation_bypass=0),
            "pp_nocheck": _open_sync(stack, ConnectionPool, dsn, kwargs=kw),
        }
        sa = _sqla_pool(dsn, kw, SIZE, pre_ping=True)
        stack.callback(sa.dispose)
        cases: dict[str, SyncLoop] = {}
        for key, pool in pools.items():
            cases[f"{key}/tight"] = _cm_loop(pool, None)
            cases[f"{key}/paced"] = _paced(_cm_loop(pool, None))
        cases["sa_ping/tight"] = _sqla_loop(sa, None)
        cases["sa_ping/paced"] = _paced(_sqla_loop(sa, None))
        for fn in cases.values():
            fn(3)
        with psycopg.connect(dsn, **kw) as probe:
            pinned = pin_backends(probe, kw["application_name"], spec["cpu"])
        # The paced loops sleep: size them by count, not by time.
        paced = {k: v for k, v in cases.items() if k.endswith("/paced")}
        tight = {k: v for k, v in cases.items() if k.endswith("/tight")}
        result = _run_sync_cases(tight, spec["rounds"], spec["target"])
        out: dict[str, list[float]] = {k: [] for k in paced}
        for r in range(spec["rounds"]):
            for k in _rotate(list(paced), r):
                n = spec["paced_n"]
                out[k].append(paced[k](n) / n * 1e6)
        result["us"].update(out)
        result["pinned"] = pinned
        result["pk_stats"] = {
            k: v for k, v in pools["pk"].stats().items() if k.startswith("validations")
        }
        return result


def _contention_summary(
    counts: list[int], waits: list[float], ops_total: int, duration: float, cpu: float
) -> dict[str, Any]:
    waits.sort()
    done = sum(counts)
    return {
        "throughput": done / duration,
        "wait_p50_ms": percentile(waits, 0.50) * 1e3,
        "wait_p99_ms": percentile(waits, 0.99) * 1e3,
        "wait_max_ms": (waits[-1] if waits else float("nan")) * 1e3,
        "cpu_us_per_op": cpu / max(ops_total, 1) * 1e6,
        "starved": sum(1 for c in counts if c == 0),
        "ops_min": min(counts),
        "ops_max": max(counts),
    }


def open_contention_pool_sync(peer: str, dsn: str, kw: dict[str, Any], size: int) -> Any:
    """The open, filled pool of `size` connections a sync contention run uses for `peer`."""
    import psycopg
    from psycopg_pool import ConnectionPool

    from poolkit import Pool

    pool: Any
    if peer.startswith("poolkit"):
        extra: dict[str, Any] = {"reset": "none"} if peer == "poolkit_noreset" else {}
        pool = Pool(dsn, min_size=size, max_size=size, open=False, timeout=60.0, kwargs=kw, **extra)
        pool.open(wait=True)
    elif peer == "psycopg_pool":
        pool = ConnectionPool(
            dsn, min_size=size, max_size=size, open=False, timeout=60.0, kwargs=kw
        )
        pool.open(wait=True)
    elif peer == "floor":
        pool = FloorPool([psycopg.connect(dsn, **kw) for _ in range(size)])
    else:
        pool = _sqla_pool(dsn, kw, size)
        fairies = [pool.connect() for _ in range(size)]  # connect all up front, like the others
        for f in fairies:
            f.close()
    return pool


def _worker_contention_sync(spec: dict[str, Any]) -> dict[str, Any]:
    dsn, _ = worker_dsns()
    kw = connect_kwargs()
    peer, size, nworkers, duration = spec["peer"], spec["size"], spec["workers"], spec["duration"]
    query = CONTENTION_QUERY
    pool = open_contention_pool_sync(peer, dsn, kw, size)

    counts = [0] * nworkers
    totals = [0] * nworkers
    waits: list[list[float]] = [[] for _ in range(nworkers)]
    start = threading.Event()
    end_at = [0.0]

    def cm_worker(i: int) -> None:
        w, done, total, end = waits[i], 0, 0, 0.0
        start.wait()
        end = end_at[0]
        while (t0 := perf_counter()) < end:
            with pool.connection() as conn:
                w.append(perf_counter() - t0)
                conn.execute(query)
            total += 1
            if perf_counter() <= end:
                done += 1
        counts[i], totals[i] = done, total

    def sqla_worker(i: int) -> None:
        w, done, total, end = waits[i], 0, 0, 0.0
        start.wait()
        end = end_at[0]
        while (t0 := perf_counter()) < end:
            fairy = pool.connect()
            w.append(perf_counter() - t0)
            try:
                fairy.driver_connection.execute(query)
            finally:
                fairy.close()
            total += 1
            if perf_counter() <= end:
                done += 1
        counts[i], totals[i] = done, total

    target = sqla_worker if peer == "sqlalchemy" else cm_worker
    cpu = run_started_threads(target, nworkers, duration, start, end_at)
    if peer == "sqlalchemy":
        pool.dispose()
    else:
        pool.close()
    return _contention_summary(counts, [x for w in waits for x in w], sum(totals), duration, cpu)


def _worker_contention_async(spec: dict[str, Any]) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        import psycopg
        from psycopg_pool import AsyncConnectionPool

        from poolkit import AsyncPool

        dsn, _ = worker_dsns()
        kw = connect_kwargs()
        peer, size, ntasks = spec["peer"], spec["size"], spec["workers"]
        duration = spec["duration"]
        query = CONTENTION_QUERY
        pool: Any = None
        engine: Any = None
        if peer in ("poolkit", "poolkit_noreset", "psycopg_pool"):
            cls = AsyncConnectionPool if peer == "psycopg_pool" else AsyncPool
            extra: dict[str, Any] = {"reset": "none"} if peer == "poolkit_noreset" else {}
            pool = cls(
                dsn, min_size=size, max_size=size, open=False, timeout=60.0, kwargs=kw, **extra
            )
            await pool.open(wait=True)
        elif peer == "floor":
            conns = [await psycopg.AsyncConnection.connect(dsn, **kw) for _ in range(size)]
            pool = AsyncFloorPool(conns)
        else:
            from sqlalchemy.ext.asyncio import create_async_engine

            async def creator() -> Any:
                return await psycopg.AsyncConnection.connect(dsn, **kw)

            # The async engine's pool is AsyncAdaptedQueuePool.
            engine = create_async_engine(
                "postgresql+psycopg://", async_creator=creator, pool_size=size, max_overflow=0,
                pool_timeout=60.0,
            )  # fmt: skip
            held = [await engine.connect() for _ in range(size)]
            for c in held:
                await c.close()

        counts = [0] * ntasks
        totals = [0] * ntasks
        waits: list[list[float]] = [[] for _ in range(ntasks)]
        start = asyncio.Event()
        end_at = [0.0]

        async def cm_worker(i: int) -> None:
            w, done, total = waits[i], 0, 0
            await start.wait()
            end = end_at[0]
            while (t0 := perf_counter()) < end:
                async with pool.connection() as conn:
                    w.append(perf_counter() - t0)
                    await conn.execute(query)
                total += 1
                if perf_counter() <= end:
                    done += 1
            counts[i], totals[i] = done, total

        async def sqla_worker(i: int) -> None:
            w, done, total = waits[i], 0, 0
            await start.wait()
            end = end_at[0]
            while (t0 := perf_counter()) < end:
                async with engine.connect() as c:
                    raw = await c.get_raw_connection()
                    w.append(perf_counter() - t0)
                    await raw.driver_connection.execute(query)
                total += 1
                if perf_counter() <= end:
                    done += 1
            counts[i], totals[i] = done, total

        target = sqla_worker if peer == "sqlalchemy" else cm_worker
        tasks = [asyncio.create_task(target(i)) for i in range(ntasks)]
        await asyncio.sleep(0.2)
        cpu0 = time.process_time()
        end_at[0] = perf_counter() + duration
        start.set()
        await asyncio.wait_for(asyncio.gather(*tasks), duration + 60)
        cpu = time.process_time() - cpu0
        if engine is not None:
            await engine.dispose()
        else:
            await pool.close()
        flat = [x for w in waits for x in w]
        return _contention_summary(counts, flat, sum(totals), duration, cpu)

    return asyncio.run(main())


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "single-sync": _worker_single_sync,
    "single-async": _worker_single_async,
    "validated": _worker_validated,
    "contention-sync": _worker_contention_sync,
    "contention-async": _worker_contention_async,
}


# -- report ----------------------------------------------------------------------------------

SYNC_ROWS = [
    ("pk_cm", "poolkit `Pool` `with connection()`", "pp_cm"),
    ("pk_leak_cm", "poolkit `Pool` `with connection()`, leak_threshold=5", "pp_cm"),
    ("pk_get", "poolkit `Pool` getconn/putconn", "pp_get"),
    ("pk_noreset_cm", "poolkit `Pool` `with connection()`, reset='none' (diagnostic)", "pp_cm"),
    ("pp_cm", "psycopg_pool `ConnectionPool` `with connection()`", "pp_cm"),
    ("pp_get", "psycopg_pool `ConnectionPool` getconn/putconn", "pp_get"),
    ("sa", "SQLAlchemy `QueuePool` connect/close", "pp_cm"),
    ("floor", "floor: minimal fair deque pool, `with`", "pp_cm"),
    ("held", "floor: held connection, no pool", "pp_cm"),
    ("held_unix", "floor: held connection, unix socket", "pp_cm"),
]
ASYNC_ROWS = [
    ("pk_cm", "poolkit `AsyncPool` `async with connection()`", "pp_cm"),
    ("pk_leak_cm", "poolkit `AsyncPool` `async with connection()`, leak_threshold=5", "pp_cm"),
    ("pk_get", "poolkit `AsyncPool` getconn/putconn", "pp_get"),
    ("pk_noreset_cm", "poolkit `AsyncPool` `async with`, reset='none' (diagnostic)", "pp_cm"),
    ("pp_cm", "psycopg_pool `AsyncConnectionPool` `async with connection()`", "pp_cm"),
    ("pp_get", "psycopg_pool `AsyncConnectionPool` getconn/putconn", "pp_get"),
    ("floor", "floor: minimal fair deque pool, `async with`", "pp_cm"),
    ("held", "floor: held connection, no pool", "pp_cm"),
]
VALIDATED_ROWS = [
    ("pk", "poolkit `Pool` default (validate, bypass window 0.5 s)"),
    ("pk_always", "poolkit `Pool` validation_bypass=0 (ping every borrow)"),
    ("pp_check", "psycopg_pool `check=ConnectionPool.check_connection`"),
    ("sa_ping", "SQLAlchemy `QueuePool` pool_pre_ping=True"),
    ("pp_nocheck", "psycopg_pool, no check (no validation at all)"),
]
CONTENTION_PEERS = {
    "sync": [
        ("poolkit", "poolkit `Pool`"),
        ("poolkit_noreset", "poolkit `Pool`, reset='none' (diagnostic)"),
        ("psycopg_pool", "psycopg_pool `ConnectionPool`"),
        ("sqlalchemy", "SQLAlchemy `QueuePool`"),
        ("floor", "floor: minimal fair pool"),
    ],
    "async": [
        ("poolkit", "poolkit `AsyncPool`"),
        ("poolkit_noreset", "poolkit `AsyncPool`, reset='none' (diagnostic)"),
        ("psycopg_pool", "psycopg_pool `AsyncConnectionPool`"),
        ("sqlalchemy", "SQLAlchemy async engine (`AsyncAdaptedQueuePool`)"),
        ("floor", "floor: minimal fair pool"),
    ],
}


def _single_table(res: dict[str, Any], rows: list[tuple[str, str, str]]) -> str:
    us = res["us"]
    out = []
    for key, label, base in rows:
        cells = [label]
        for mode in ("noop", "select"):
            vals = us.get(f"{key}/{mode}")
            ref = us.get(f"{base}/{mode}")
            if vals is None:
                cells += ["—", ""]
            else:
                cells += [fmt_spread(vals), fmt_ratio(vals, ref) if ref else ""]
        out.append(cells)
    heads = ["peer", "borrow+return µs", "x psycopg_pool", "+ `SELECT 1` µs", "x psycopg_pool"]
    return markdown_table(heads, out)


def _validated_table(res: dict[str, Any]) -> str:
    us = res["us"]
    out = []
    for key, label in VALIDATED_ROWS:
        cells = [label]
        for mode in ("tight", "paced"):
            vals, ref = us[f"{key}/{mode}"], us[f"pp_check/{mode}"]
            cells += [fmt_spread(vals), fmt_ratio(vals, ref)]
        out.append(cells)
    heads = [
        "peer", "back-to-back µs", "x psycopg_pool check", "idle 2 ms between µs",
        "x psycopg_pool check",
    ]  # fmt: skip
    return markdown_table(heads, out)


def _contention_table(res: dict[str, list[dict[str, Any]]], mode: str) -> str:
    base = res["psycopg_pool"]
    out = []
    for peer, label in CONTENTION_PEERS[mode]:
        if peer not in res:
            continue
        rounds = res[peer]

        def col(key: str, rs: list[dict[str, Any]] = rounds) -> list[float]:
            return [r[key] for r in rs]

        def with_ratio(key: str) -> str:
            return f"{fmt(median(col(key)))} ({fmt_ratio(col(key), col(key, base), brief=True)})"

        starved = col("starved")
        out.append([
            label,
            fmt_spread(col("throughput"), 0),
            fmt_ratio(col("throughput"), col("throughput", base)),
            with_ratio("wait_p50_ms"),
            with_ratio("wait_p99_ms"),
            with_ratio("wait_max_ms"),
            fmt_spread(col("cpu_us_per_op"), 0),
            fmt_ratio(col("cpu_us_per_op"), col("cpu_us_per_op", base)),
            f"{median(starved):.0f} (max {max(starved):.0f})",
            f"{median(col('ops_min')):.0f}-{median(col('ops_max')):.0f}",
        ])  # fmt: skip
    heads = [
        "peer", "ops/s", "x psycopg_pool", "wait p50 ms", "wait p99 ms", "wait max ms",
        "client CPU µs/op", "x psycopg_pool", "starved workers", "ops per worker",
    ]  # fmt: skip
    return markdown_table(heads, out)


def _ratio_median(values: list[float], base: list[float]) -> float:
    return median(paired_ratios(values, base))


def _targets(
    sync: dict[str, Any], asyn: dict[str, Any], val: dict[str, Any], cont: dict[str, Any]
) -> str:
    rows = []

    def ratio(res: dict[str, Any], key: str, base: str) -> float:
        return _ratio_median(res["us"][key], res["us"][base])

    def add(what: str, bar: str, value: float, ok: bool, ref: str) -> None:
        rows.append([what, bar, f"{value:.3f}x", "met" if ok else "**missed**", ref])

    for name, res in (("sync", sync), ("async", asyn)):
        r = ratio(res, "pk_cm/noop", "pp_cm/noop")
        ref = f"floor {ratio(res, 'floor/noop', 'pp_cm/noop'):.2f}x"
        add(f"uncontended `connection()` borrow+return, {name}", "<= 0.50x", r, r <= 0.5, ref)
    for mode, label in (("tight", "back-to-back"), ("paced", "2 ms idle")):
        r = ratio(val, f"pk/{mode}", f"pp_check/{mode}")
        ref = f"no validation at all {ratio(val, f'pp_nocheck/{mode}', f'pp_check/{mode}'):.2f}x"
        add(f"validated borrow ({label}) vs psycopg_pool check", "<= 0.10x", r, r <= 0.1, ref)

    def cratio(mode: str, peer: str, key: str) -> float:
        runs, base = cont[mode][peer], cont[mode]["psycopg_pool"]
        return _ratio_median([x[key] for x in runs], [x[key] for x in base])

    for mode, min_tp in (("sync", 1.0), ("async", 1.05)):
        for key, what, bar in (
            ("throughput", "throughput", f">= {min_tp:.2f}x"),
            ("cpu_us_per_op", "client CPU per op", "<= 0.80x"),
        ):
            r = cratio(mode, "poolkit", key)
            ok = r >= min_tp if key == "throughput" else r <= 0.8
            ref = (
                f"reset='none' {cratio(mode, 'poolkit_noreset', key):.2f}x, "
                f"floor {cratio(mode, 'floor', key):.2f}x"
            )
            add(f"contention {what}, {mode}", bar, r, ok, ref)
        starved = max(x["starved"] for x in cont[mode]["poolkit"])
        rows.append([f"contention starved workers, {mode}", "0", f"{starved} (worst round)",
                     "met" if starved == 0 else "**missed**", ""])  # fmt: skip
    return markdown_table(["target", "bar", "poolkit", "verdict", "for reference"], rows)


def _report(args: argparse.Namespace, info: dict[str, str], res: dict[str, Any]) -> str:
    cpu = res["cpu"]
    sync, asyn, val, cont = res["single-sync"], res["single-async"], res["validated"], res["cont"]
    parts = [
        f"# poolkit core benchmark, {info['date']}",
        "",
        *header_lines(info),
        f"- command: `{res['command']}`; total run time {res['elapsed']:.0f} s",
        f"- single-thread figures: client under `taskset -c {cpu}`, {sync['pinned']}; "
        f"{args.rounds} interleaved rounds per figure, shown as median (min-max); a ratio is "
        "the median of the round-by-round ratios to psycopg_pool measured in the same rounds.",
        "- every pool holds 4 connections (`autocommit=True`) over TCP 127.0.0.1; poolkit "
        "runs with its defaults (stats and the borrow registry on, validation with a 0.5 s "
        "bypass window, reset policy `auto`).",
        "",
        "## 1. Uncontended borrow+return, single thread, sync",
        "",
        _single_table(sync, SYNC_ROWS),
        "",
        "getconn/putconn rows are divided by psycopg_pool's getconn/putconn, every other row "
        "by psycopg_pool's `with connection()`.",
        "",
        "## 1b. Uncontended borrow+return, single thread, asyncio",
        "",
        _single_table(asyn, ASYNC_ROWS),
        "",
        "## 2. Validated borrows (borrow+return, no query)",
        "",
        _validated_table(val),
        "",
        f"Back-to-back: the next borrow starts as soon as the last one returned. Idle 2 ms: "
        f"each borrow after the connection sat idle {PACE_GAP * 1e3:.0f} ms (steady load "
        f"with gaps: poolkit peeks at the socket instead of skipping it); "
        f"{args.paced_n} timed borrows per round. poolkit default counters: "
        f"{json.dumps(val['pk_stats'])}.",
        "",
        f"## 3. Contention: `{CONTENTION_QUERY}` for {args.duration:.0f} s per round, "
        f"pool of {args.pool}, {len(cont['sync']['poolkit'])} rounds sync / "
        f"{len(cont['async']['poolkit'])} async",
        "",
        f"### {args.threads} threads, sync",
        "",
        _contention_table(cont["sync"], "sync"),
        "",
        f"### {args.tasks} asyncio tasks",
        "",
        _contention_table(cont["async"], "async"),
        "",
        *(
            ["SQLAlchemy's async engine left out: greenlet is not installed.", ""]
            if "sqlalchemy" in args.skip["async"]
            else []
        ),
        f"Each round is a fresh process (client under `taskset -c {cpu}`, backends not "
        "pinned); peers interleaved round by round. ops/s counts operations finished within "
        "the window; wait is the time to obtain a connection; client CPU is the process's "
        "CPU time (user+system) over the run divided by the operations; starved workers got "
        "no connection for the whole window; ops per worker is the fewest and the most "
        "operations one worker finished. Figures other than ops/s and CPU are the median "
        "over rounds.",
        "",
        "## Targets (docs/benchmarks.md)",
        "",
        _targets(sync, asyn, val, cont),
        "",
    ]
    return "\n".join(parts)


# -- orchestration ---------------------------------------------------------------------------


def _progress(t0: float, what: str) -> None:
    print(f"[{time.monotonic() - t0:6.1f} s] {what}", file=sys.stderr, flush=True)


def _orchestrate(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    cpu = pin_cpu()
    pin = None if args.no_pin else cpu
    res: dict[str, Any] = {"cpu": cpu, "command": " ".join(["python -m bench.core", *args.argv])}
    _progress(t0, "starting the server")
    with bench_server() as server:
        info = machine_info(server)
        spec = {"rounds": args.rounds, "target": args.target, "cpu": cpu, "paced_n": args.paced_n}

        def worker(kind: str, spec: dict[str, Any], timeout: float) -> Any:
            argv = ["--worker", kind, "--spec", json.dumps(spec)]
            return run_worker(MODULE, argv, server, pin=pin, timeout=timeout)

        for kind in ("single-sync", "single-async", "validated"):
            _progress(t0, f"{kind}: {args.rounds} rounds")
            res[kind] = worker(kind, spec, 300)
        res["cont"] = {}
        for mode, nworkers in (("sync", args.threads), ("async", args.tasks)):
            peers = [p for p, _ in CONTENTION_PEERS[mode] if p not in args.skip[mode]]
            rounds: dict[str, list[dict[str, Any]]] = {p: [] for p in peers}
            for r in range(args.cont_rounds):
                # Stay inside the time budget: drop whole rounds, never part of one.
                left = args.budget - (time.monotonic() - t0)
                per_round = len(peers) * (args.duration + 1.5) * (2 if mode == "sync" else 1)
                if r >= 2 and left < per_round:
                    _progress(t0, f"time budget: {mode} contention stops after {r} rounds")
                    break
                for peer in _rotate(peers, r):
                    _progress(t0, f"contention {mode} round {r + 1}/{args.cont_rounds}: {peer}")
                    cspec = {"peer": peer, "size": args.pool, "workers": nworkers,
                             "duration": args.duration}  # fmt: skip
                    rounds[peer].append(worker(f"contention-{mode}", cspec, args.duration + 90))
            res["cont"][mode] = rounds
        res["elapsed"] = time.monotonic() - t0
        report = _report(args, info, res)
    print(report)
    if args.quick:
        return 0  # a smoke run never replaces the day's results
    path = write_results("core", report)
    _progress(t0, f"written {path.relative_to(path.parents[2])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.core", description=__doc__)
    p.add_argument("--rounds", type=int, default=7, help="rounds per single-thread figure")
    p.add_argument("--target", type=float, default=0.15, help="seconds per timed loop")
    p.add_argument("--paced-n", type=int, default=150, help="timed borrows per paced round")
    p.add_argument("--cont-rounds", type=int, default=7, help="rounds per contention figure")
    p.add_argument(
        "--budget",
        type=float,
        default=420.0,
        help="seconds; contention rounds are dropped to stay inside it",
    )
    p.add_argument("--duration", type=float, default=3.0, help="seconds per contention round")
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--tasks", type=int, default=200)
    p.add_argument("--pool", type=int, default=8, help="pool size under contention")
    p.add_argument("--no-pin", action="store_true", help="do not use taskset")
    p.add_argument("--quick", action="store_true", help="smoke test: short rounds, nothing written")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = argv
    if args.worker:
        emit_result(WORKERS[args.worker](json.loads(args.spec)))
        return 0
    args.skip = {"sync": set(), "async": set()}
    if importlib.util.find_spec("greenlet") is None:
        # SQLAlchemy 2.1 installs greenlet only with the [asyncio] extra.
        args.skip["async"].add("sqlalchemy")
        print(
            "greenlet is not installed: the SQLAlchemy async engine is left out "
            "(pip install 'sqlalchemy[asyncio]' to include it)",
            file=sys.stderr,
        )
    if args.quick:
        args.rounds, args.cont_rounds, args.duration = 2, 1, 1.0
        args.target, args.paced_n = 0.03, 30
    return _orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
