"""Django end to end: poolkit_django vs Django's native pool vs CONN_MAX_AGE=0 vs CONN_MAX_AGE=600.

Run: `.venv/bin/python -m bench.http_django` (about 6 minutes). Each configuration is a
gunicorn process (one gthread worker with 8 threads, pinned to CPU 0) serving the same
view (`SELECT 1`; `--views select,insert` adds a small insert). wrk (2 threads, 32
keep-alive connections; or a bounded httpx client) pinned to CPU 1 drives it. poolkit_django
runs as the docs recommend (PoolkitMiddleware first in MIDDLEWARE: 503 on exhaustion, hold
time per view), per request (CONN_MAX_AGE=0) and with persistent connections parked in the
pool (CONN_MAX_AGE=600). Rounds interleave the configurations (the order rotates) so drift
hits them alike; ratios are medians of per-round ratios, with their min-max.

`--suite release`: 64 gthread threads, pools of 8, a view that runs a query, waits 20 ms on
something that is not the database, and runs another: poolkit_django borrowing per request
vs OPTIONS["pool"]["release"] = "transaction".

Uses $POOLKIT_BENCH_DSN, else an embedded server in .poolkit/bench-pgdata. This module is
also the Django project gunicorn serves: $BENCH_DJANGO_APP picks the configuration when
gunicorn imports `bench.http_django:application`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from bench._http import (
    SERVER_CPU,
    Result,
    fmt_ms,
    free_port,
    load,
    load_tool,
    machine,
    pin_backends,
    pinning,
    summarize,
    versions,
)

ROOT = Path(__file__).resolve().parent.parent
POOL_SIZE = 8
TABLE = "bench_http_django"
DSN_VAR = "BENCH_HTTP_DSN"
APP_VAR = "BENCH_DJANGO_APP"
WAIT = 0.02  # seconds the release suite's view waits between its two queries
_MW = ["poolkit_django.PoolkitMiddleware"]
_POOL: dict[str, Any] = {"min_size": POOL_SIZE, "max_size": POOL_SIZE}


class App(NamedTuple):
    engine: str
    pool: dict[str, Any] | None  # OPTIONS["pool"]; None: no pool
    max_age: int
    middleware: list[str]


APPS: dict[str, App] = {
    "poolkit_django": App("poolkit_django", _POOL, 0, _MW),
    "poolkit_django, CONN_MAX_AGE=600": App("poolkit_django", _POOL, 600, _MW),
    "native pool": App("django.db.backends.postgresql", _POOL, 0, []),
    "CONN_MAX_AGE=0": App("django.db.backends.postgresql", None, 0, []),
    "CONN_MAX_AGE=600": App("django.db.backends.postgresql", None, 600, []),
    # The release suite.
    "per request": App("poolkit_django", _POOL, 0, _MW),
    "release=transaction": App("poolkit_django", {**_POOL, "release": "transaction"}, 0, _MW),
}


class Suite(NamedTuple):
    apps: list[str]
    views: dict[str, str]
    threads: int  # gunicorn threads
    conns: int  # wrk connections
    baselines: list[str]  # ratios of every configuration against each of these


SUITES = {
    "http": Suite(
        [
            "poolkit_django",
            "poolkit_django, CONN_MAX_AGE=600",
            "native pool",
            "CONN_MAX_AGE=0",
            "CONN_MAX_AGE=600",
        ],
        {"SELECT 1": "/select", "small insert": "/insert"},
        8,
        32,
        ["native pool", "CONN_MAX_AGE=600", "CONN_MAX_AGE=0"],
    ),
    "release": Suite(
        ["per request", "release=transaction"],
        {f"2 queries + {WAIT * 1000:.0f} ms wait": "/wait2"},
        64,
        64,
        ["per request"],
    ),
}
PACKAGES = ("django", "gunicorn", "psycopg", "psycopg-pool")


# -- the Django project gunicorn serves --------------------------------------------------------


def select_view(request: Any) -> Any:
    from django.db import connection
    from django.http import HttpResponse

    with connection.cursor() as cur:
        cur.execute("SELECT 1")
        cur.fetchone()
    return HttpResponse(b"ok")


def insert_view(request: Any) -> Any:
    from django.db import connection
    from django.http import HttpResponse

    with connection.cursor() as cur:
        cur.execute(f"INSERT INTO {TABLE} (app) VALUES (%s)", [os.environ[APP_VAR]])
    return HttpResponse(b"ok")


def wait2_view(request: Any) -> Any:
    from django.db import connection
    from django.http import HttpResponse

    with connection.cursor() as cur:
        cur.execute("SELECT 1")
        cur.fetchone()
    time.sleep(WAIT)  # an HTTP call, a cache, a template: anything but the database
    with connection.cursor() as cur:
        cur.execute("SELECT 2")
        cur.fetchone()
    return HttpResponse(b"ok")


def ping_view(request: Any) -> Any:
    from django.http import HttpResponse

    return HttpResponse(b"ok")


def pid_view(request: Any) -> Any:
    from django.http import HttpResponse

    return HttpResponse(str(os.getpid()).encode())


def pool_view(request: Any) -> Any:
    """The worker's pool counters (poolkit_django only): steals show up here."""
    import json

    from django.db import connection
    from django.http import HttpResponse

    pool = getattr(connection, "pool", None)
    if pool is None or not hasattr(pool, "stats"):
        return HttpResponse(b"{}")
    out = {k: v for k, v in pool.stats().items() if isinstance(v, int)}
    out["stolen"] = getattr(pool, "_n_stolen", -1)
    return HttpResponse(json.dumps(out).encode())


def _configure() -> Any:
    """Settings for $BENCH_DJANGO_APP; returns Django's WSGI handler."""
    import django
    from django.conf import settings
    from django.core.handlers.wsgi import WSGIHandler
    from psycopg.conninfo import conninfo_to_dict

    engine, pool, max_age, middleware = APPS[os.environ[APP_VAR]]
    params = conninfo_to_dict(os.environ[DSN_VAR])
    db: dict[str, Any] = {
        "ENGINE": engine,
        "NAME": params.get("dbname", ""),
        "USER": params.get("user", ""),
        "PASSWORD": params.get("password", ""),
        "HOST": params.get("host", ""),
        "PORT": params.get("port", ""),
        "CONN_MAX_AGE": max_age,
        "OPTIONS": {"pool": dict(pool) if pool else False},
    }
    if engine != "poolkit_django" and not pool:
        db["OPTIONS"] = {}
    settings.configure(
        DEBUG=False,
        ALLOWED_HOSTS=["*"],
        SECRET_KEY="bench-not-secret",
        USE_TZ=True,
        DATABASES={"default": db},
        INSTALLED_APPS=[],
        MIDDLEWARE=middleware,
        ROOT_URLCONF=__name__,
    )
    django.setup()
    return WSGIHandler()


def __getattr__(name: str) -> Any:
    # gunicorn imports `bench.http_django:application`; the runner imports this module too
    # and must not configure Django.
    if name == "application":
        app = _configure()
        globals()["application"] = app
        return app
    if name == "urlpatterns":
        from django.urls import path

        patterns = [
            path("ping", ping_view),
            path("pid", pid_view),
            path("pool", pool_view),
            path("select", select_view),
            path("insert", insert_view),
            path("wait2", wait2_view),
        ]
        globals()["urlpatterns"] = patterns
        return patterns
    raise AttributeError(name)


# -- the run -----------------------------------------------------------------------------------


@contextlib.contextmanager
def gunicorn_server(app: str, dsn: str, threads: int = 8) -> Iterator[str]:
    """One gthread worker with `threads` threads (pinned to CPU 0); yields its base URL."""
    from gunicorn.config import KNOWN_SETTINGS

    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "bench.http_django:application",
            "--bind", f"127.0.0.1:{port}", "--workers", "1", "--worker-class", "gthread",
            "--threads", str(threads), "--log-level", "warning"]  # fmt: skip
    if any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS):
        argv.append("--no-control-socket")  # a fixed path shared by every gunicorn
    if pinning():
        argv = ["taskset", "-c", SERVER_CPU, *argv]
    env = {**os.environ, DSN_VAR: dsn, APP_VAR: app, "PYTHONPATH": str(ROOT)}
    log = tempfile.TemporaryFile()  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url + "/ping", proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Any, timeout: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{url}: gunicorn exited:\n{log.read().decode(errors='replace')}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout:g} s")


def _worker_pid(url: str) -> int:
    import urllib.request

    with urllib.request.urlopen(url + "/pid", timeout=10) as resp:
        return int(resp.read())


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc; 0 where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_dsn() -> str:
    dsn = os.environ.get("POOLKIT_BENCH_DSN")
    if dsn:
        return dsn
    from example_apps._embedded_pg import ensure_server

    with contextlib.redirect_stdout(sys.stderr):
        return ensure_server(Path(".poolkit/bench-pgdata"))


def main(argv: list[str] | None = None) -> int:
    import psycopg

    parser = argparse.ArgumentParser(prog="python -m bench.http_django", description=__doc__)
    parser.add_argument("--suite", choices=list(SUITES), default="http")
    parser.add_argument("--duration", type=int, default=8, help="seconds per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="seconds before each one")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--views", default="select", help="comma-separated: select,insert")
    args = parser.parse_args(argv)
    suite = SUITES[args.suite]
    views = {
        k: v
        for k, v in suite.views.items()
        if args.suite != "http" or v[1:] in args.views.split(",")
    }
    budget = len(suite.apps) * len(views) * args.rounds * (args.duration + args.warmup + 0.5)
    print(f"# about {budget / 60:.1f} min of load, plus startup", file=sys.stderr, flush=True)

    dsn = _server_dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigserial PRIMARY KEY, app text)")
        conn.execute(f"TRUNCATE {TABLE}")
    results: dict[tuple[str, str], list[Result]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    stolen: dict[str, list[int]] = {}  # name -> [parked connections taken over, requests]
    with contextlib.ExitStack() as stack:
        urls = {
            name: stack.enter_context(gunicorn_server(name, dsn, suite.threads))
            for name in suite.apps
        }
        workers = {name: _worker_pid(url) for name, url in urls.items()}
        names = list(suite.apps)
        for round_no in range(args.rounds):
            for view, path in views.items():
                # Rotate the order every round so no configuration always runs first.
                shift = round_no % len(names)
                for name in names[shift:] + names[:shift]:
                    url = urls[name] + path
                    load(url, suite.conns, args.warmup, method="GET", threads=2)
                    pin_backends(dsn, [workers[name]])
                    cpu0 = _cpu_seconds(workers[name])
                    stolen0 = _stolen(urls[name])
                    result = load(url, suite.conns, args.duration, method="GET", threads=2)
                    used = _cpu_seconds(workers[name]) - cpu0
                    if stolen0 is not None:
                        # In-flight requests may still end after wrk: close enough.
                        stolen.setdefault(name, [0, 0])
                        stolen[name][0] += (_stolen(urls[name]) or 0) - stolen0
                        stolen[name][1] += result.requests
                    per_request = used / result.requests if result.requests else 0.0
                    results.setdefault((name, view), []).append(result)
                    cpu.setdefault((name, view), []).append(per_request)
                    print(
                        f"# round {round_no + 1} {name} {view}: {result.rps:.0f} req/s, "
                        f"p50 {fmt_ms(result.p50)} ms, p99 {fmt_ms(result.p99)} ms, "
                        f"{per_request * 1e6:.0f} us CPU/request, {result.errors} errors",
                        file=sys.stderr,
                        flush=True,
                    )
                    time.sleep(0.2)
    print(report(suite, views, results, cpu, args, dsn, stolen))
    return 0


def _stolen(base_url: str) -> int | None:
    """How many parked connections the worker's pool took over so far (None: no pool)."""
    import json
    import urllib.request

    with urllib.request.urlopen(base_url + "/pool", timeout=10) as resp:
        stolen = json.loads(resp.read()).get("stolen")
    return None if stolen is None or stolen < 0 else int(stolen)


def ratio_range(runs: Sequence[Result], base: Sequence[Result]) -> str:
    """Median of per-round req/s ratios (same round, seconds apart) and their min-max."""
    ratios = [r.rps / b.rps for r, b in zip(runs, base, strict=True) if r.requests and b.rps]
    if not ratios:
        return "n/a"
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def report(
    suite: Suite,
    views: dict[str, str],
    results: dict[tuple[str, str], list[Result]],
    cpu: dict[tuple[str, str], list[float]],
    args: argparse.Namespace,
    dsn: str,
    stolen: dict[str, list[int]] | None = None,
) -> str:
    from poolkit import mask_conninfo

    pin = pinning()
    lines = [
        f"Django over HTTP ({args.suite}), {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()}; "
        f"gunicorn 1 gthread worker x {suite.threads} threads{' on CPU 0' if pin else ''}, "
        f"{load_tool()} 2 threads{' on CPU 1' if pin else ''}, {suite.conns} connections; "
        f"pools of {POOL_SIZE}{'; PostgreSQL backends on CPU 1' if pin else ''}; "
        f"{args.rounds} interleaved rounds of {args.duration} s. req/s, "
        "p50, p99 and CPU (the worker's user+system time per request) are medians over the "
        "rounds; ratios are medians of per-round ratios, (min-max) over the rounds.",
        "",
        "| view | configuration | req/s | p50 ms | p99 ms | CPU µs/req | errors | "
        + " | ".join(f"vs {b}" for b in suite.baselines)
        + " |",
        "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(suite.baselines),
    ]
    for view in views:
        for name in suite.apps:
            runs = results[(name, view)]
            r = summarize(runs)
            per_req = statistics.median(cpu[(name, view)])
            ratios = " | ".join(
                ratio_range(runs, results[(b, view)]) if b != name else "-" for b in suite.baselines
            )
            lines.append(
                f"| {view} | {name} | {r.rps:.0f} | {fmt_ms(r.p50)} | {fmt_ms(r.p99)} | "
                f"{per_req * 1e6:.0f} | {r.errors} | {ratios} |"
            )
    taken = [
        f"{name} {n / max(1, reqs) * 1000:.2f}"
        for name, (n, reqs) in (stolen or {}).items()
        if "CONN_MAX_AGE" in name
    ]
    if taken:
        lines += ["", "Parked connections taken over by another thread, per 1000 requests: "
                  + ", ".join(taken) + "."]  # fmt: skip
    lines += ["", f"{versions(*PACKAGES)}; server {mask_conninfo(dsn)}."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
