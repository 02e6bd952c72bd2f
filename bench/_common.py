"""Helpers every benchmark script shares: the server, CPU pinning, workers, statistics, tables."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
# Persistent (gitignored) so repeated runs skip initdb; a killed run's server is adopted.
SERVER_DIR = REPO_ROOT / ".poolkit" / "bench-pg"

DSN_ENV = "POOLKIT_BENCH_DSN"
# How the orchestrator hands the server to its workers (the DSN holds a password: never argv).
WORKER_DSN_ENV = "POOLKIT_BENCH_WORKER_DSN"
WORKER_UNIX_DSN_ENV = "POOLKIT_BENCH_WORKER_UNIX_DSN"
RESULT_PREFIX = "BENCH-RESULT "


# -- the server ------------------------------------------------------------------------------


@dataclass
class Server:
    dsn: str  # TCP, password included
    unix_dsn: str | None  # unix socket, when we started the server ourselves
    label: str  # for reports: no password


@contextlib.contextmanager
def bench_server() -> Iterator[Server]:
    """$POOLKIT_BENCH_DSN when set, else an embedded PostgreSQL on 127.0.0.1, stopped after."""
    external = os.environ.get(DSN_ENV)
    if external:
        from poolkit import mask_conninfo

        yield Server(external, None, f"external ({DSN_ENV}={mask_conninfo(external)})")
        return
    from example_apps._embedded_pg import EmbeddedPostgres

    SERVER_DIR.parent.mkdir(parents=True, exist_ok=True)
    server = EmbeddedPostgres(SERVER_DIR)
    server.start()
    try:
        yield Server(server.dsn, server.admin_dsn, f"embedded, {server.dsn_without_password}")
    finally:
        server.stop()


# -- pinning and workers ---------------------------------------------------------------------


def pin_cpu() -> int:
    """The CPU single-thread measurements run on: the last one this process may use."""
    return max(os.sched_getaffinity(0))


def run_worker(
    module: str, args: Sequence[str], server: Server, *, pin: int | None, timeout: float
) -> Any:
    """Run `python -m module --worker ...` (under `taskset -c pin` if given); return its JSON.

    The worker prints one line starting with RESULT_PREFIX; everything else it writes goes
    to our stderr so progress and warnings stay visible.
    """
    cmd = [sys.executable, "-m", module, *args]
    if pin is not None:
        taskset = shutil.which("taskset")
        if taskset is None:
            raise RuntimeError("taskset not found: install util-linux, or run with --no-pin")
        cmd = [taskset, "-c", str(pin), *cmd]
    env = dict(os.environ)
    env[WORKER_DSN_ENV] = server.dsn
    if server.unix_dsn:
        env[WORKER_UNIX_DSN_ENV] = server.unix_dsn
    env.pop(DSN_ENV, None)
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {' '.join(args)} failed (exit code {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def worker_dsns() -> tuple[str, str | None]:
    """In a worker: the TCP and unix-socket DSNs the orchestrator passed."""
    return os.environ[WORKER_DSN_ENV], os.environ.get(WORKER_UNIX_DSN_ENV)


def emit_result(result: Any) -> None:
    """In a worker: hand the result back to run_worker()."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def pin_backends(conn: Any, application_name: str, cpu: int) -> str:
    """Pin the server processes of our connections to `cpu`; say what happened.

    A round trip costs ~37 µs when the client and its backend share a CPU and ~120 µs when
    the scheduler puts them on different ones: pinning both makes the figure repeatable.
    Needs the server on this machine and permission to set its affinity (root, or the
    same user); otherwise nothing is pinned and the report says so.
    """
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application_name,)
    ).fetchall()
    pinned = 0
    for (pid,) in rows:
        try:
            os.sched_setaffinity(pid, {cpu})
            pinned += 1
        except OSError:
            pass
    if pinned == len(rows) and rows:
        return f"{pinned} backends pinned to CPU {cpu}"
    return f"{pinned}/{len(rows)} backends pinned to CPU {cpu} (no permission or remote server)"


# -- statistics ------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (q in 0..1)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def paired_ratios(values: Sequence[float], base: Sequence[float]) -> list[float]:
    """Round-by-round ratios: both series were measured interleaved, so drift cancels."""
    return [v / b for v, b in zip(values, base, strict=True) if b]


def fmt(x: float, digits: int | None = None) -> str:
    """A figure with about three significant digits (or a fixed number of decimals)."""
    if x != x:  # nan
        return "n/a"
    if digits is not None:
        return f"{x:.{digits}f}"
    ax = abs(x)
    if ax >= 100:
        return f"{x:,.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_spread(values: Sequence[float], digits: int | None = None) -> str:
    """`median (min-max)` of per-round figures."""
    if not values:
        return "n/a"
    return f"{fmt(median(values), digits)} ({fmt(min(values), digits)}-{fmt(max(values), digits)})"


def fmt_ratio(values: Sequence[float], base: Sequence[float], *, brief: bool = False) -> str:
    """Median of paired per-round ratios, `x`-suffixed; the range too when it is wide."""
    ratios = paired_ratios(values, base)
    if not ratios:
        return "n/a"
    m, lo, hi = median(ratios), min(ratios), max(ratios)
    text = f"{m:.2f}x"
    return text if brief or hi - lo < 0.1 * m else f"{text} ({lo:.2f}-{hi:.2f})"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table; the first column left-aligned, the rest right."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        out = [cells[0].ljust(widths[0])]
        out += [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "| " + " | ".join(out) + " |"

    sep = ["-" * widths[0]] + ["-" * (w - 1) + ":" for w in widths[1:]]
    return "\n".join([line(headers), "| " + " | ".join(sep) + " |", *map(line, rows)])


# -- the machine -----------------------------------------------------------------------------


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(server: Server) -> dict[str, str]:
    """Date, machine and versions for the report header."""
    import psycopg

    with psycopg.connect(server.dsn, autocommit=True) as conn:
        pg = conn.execute("SHOW server_version").fetchone()
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"nproc {len(os.sched_getaffinity(0))}, {cpu_model()}, "
        f"Linux {platform.release()}",
        "python": platform.python_version(),
        "psycopg": _version("psycopg"),
        "psycopg_pool": _version("psycopg-pool"),
        "sqlalchemy": _version("sqlalchemy"),
        "postgresql": f"{pg[0] if pg else '?'} ({server.label})",
    }


def header_lines(info: dict[str, str]) -> list[str]:
    return [f"- {key}: {value}" for key, value in info.items()]


def write_results(prefix: str, text: str) -> Path:
    """Write `bench/results/<prefix>-<date>.md` (a second run the same day overwrites)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{prefix}-{datetime.date.today().isoformat()}.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


# -- the floor: a minimal fair pool ----------------------------------------------------------
# What borrow+return costs with nothing but a deque, a lock and FIFO hand-off to waiters:
# the reference the real pools are read against. No growth, no checks, no stats.

_IDLE_TX = 0  # psycopg.pq.TransactionStatus.IDLE


def run_started_threads(
    target: Callable[[int], None],
    n: int,
    duration: float,
    start: threading.Event,
    end_at: list[float],
) -> float:
    """Run `target(i)` on n threads for `duration` s; the process's CPU seconds meanwhile.

    Every thread first waits on `start`; `end_at[0]` is set (perf_counter) just before it
    is released, so that thread start-up stays out of the window and of the CPU count.
    """
    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    time.sleep(0.2)  # every thread parked on the start event
    cpu0 = time.process_time()
    end_at[0] = time.perf_counter() + duration
    start.set()
    for t in threads:
        t.join(duration + 60)
    return time.process_time() - cpu0


class FloorPool:
    """A fixed set of connections shared by threads; waiters are served first come first served."""

    def __init__(self, conns: list[Any]) -> None:
        self._idle = deque(conns)
        self._waiters: deque[list[Any]] = deque()  # [conn or None, pre-acquired lock]
        self._lock = threading.Lock()

    def getconn(self, timeout: float = 30.0) -> Any:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            slot: list[Any] = [None, threading.Lock()]
            slot[1].acquire()
            self._waiters.append(slot)
        if not slot[1].acquire(timeout=timeout):
            with self._lock:
                if slot[0] is None:
                    self._waiters.remove(slot)
                    raise TimeoutError(f"no connection within {timeout} s")
        return slot[0]

    def putconn(self, conn: Any) -> None:
        with self._lock:
            if self._waiters:
                slot = self._waiters.popleft()
                slot[0] = conn
                slot[1].release()
            else:
                self._idle.append(conn)

    def connection(self) -> _FloorLease:
        return _FloorLease(self)

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


class _FloorLease:
    __slots__ = ("conn", "pool")

    def __init__(self, pool: FloorPool) -> None:
        self.pool = pool

    def __enter__(self) -> Any:
        self.conn = self.pool.getconn()
        return self.conn

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        conn = self.conn
        if conn.pgconn.transaction_status != _IDLE_TX:
            conn.commit() if et is None else conn.rollback()
        self.pool.putconn(conn)


class AsyncFloorPool:
    """FloorPool for asyncio: one event loop, so no lock; waiters are futures served FIFO."""

    def __init__(self, conns: list[Any]) -> None:
        self._idle = deque(conns)
        self._waiters: deque[asyncio.Future[Any]] = deque()

    async def getconn(self, timeout: float = 30.0) -> Any:
        if self._idle:
            return self._idle.pop()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except BaseException:
            # Cancelled or timed out after the hand-off: never lose the connection.
            if fut.done() and not fut.cancelled():
                self.putconn(fut.result())
            raise

    def putconn(self, conn: Any) -> None:
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        self._idle.append(conn)

    def connection(self) -> _AsyncFloorLease:
        return _AsyncFloorLease(self)

    async def close(self) -> None:
        while self._idle:
            await self._idle.pop().close()


class _AsyncFloorLease:
    __slots__ = ("conn", "pool")

    def __init__(self, pool: AsyncFloorPool) -> None:
        self.pool = pool

    async def __aenter__(self) -> Any:
        self.conn = await self.pool.getconn()
        return self.conn

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        conn = self.conn
        if conn.pgconn.transaction_status != _IDLE_TX:
            await (conn.commit() if et is None else conn.rollback())
        self.pool.putconn(conn)
