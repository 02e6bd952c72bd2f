"""Django in one process, no HTTP: the CPU cost of one request, per configuration.

Run: `.venv/bin/python -m bench.inproc_django` (about a minute). Each configuration of
bench.http_django is its own child process that calls Django's WSGI handler directly
(`GET /select`: one `SELECT 1`) with no server and no client, and counts CPU time, so
the wait for the server's answer is left out: Django's and the backend's own work per
request. One thread by default (its time.thread_time()); `--threads 8` runs requests on
8 threads at once, as gunicorn's gthread worker does, and counts the process's CPU time.
Children run in interleaved rounds (the order rotates); each round reports the best of a
few batches, and ratios are medians of per-round ratios with their min-max.

`--profile NAME` runs one configuration under cProfile instead and prints the top
functions (`--sort tottime` or `cumulative`): where the time of a request goes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from bench.http_django import APP_VAR, APPS, DSN_VAR, ROOT

DEFAULT_APPS = (
    "poolkit_django",
    "poolkit_django, CONN_MAX_AGE=600",
    "native pool",
    "CONN_MAX_AGE=600",
)


def _environ(path: str) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "bench",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }


def _app() -> Any:
    import bench.http_django as project

    return project.application


def _one(app: Any, path: str) -> None:
    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        if not status.startswith("200"):
            raise RuntimeError(f"{path}: {status}")
        return lambda data: None

    body = app(_environ(path), start_response)
    for _ in body:
        pass
    body.close()


def child(path: str, requests: int, batches: int, threads: int) -> None:
    """Print the best CPU µs/request of `batches` batches of `requests` requests per thread.

    One thread: that thread's CPU time. Several (as gunicorn's gthread workers, each
    request on a thread of its own, contending for the GIL and the pool's lock): the
    process's CPU time over all their requests.
    """
    import threading

    app = _app()
    for _ in range(200):  # warm-up: pool open, caches filled
        _one(app, path)
    clock = time.thread_time if threads == 1 else time.process_time

    def work() -> None:
        from django.db import connections

        for _ in range(requests):
            _one(app, path)
        connections.close_all()

    best = float("inf")
    for _ in range(batches):
        t0 = clock()
        if threads == 1:
            for _ in range(requests):
                _one(app, path)
        else:
            pool = [threading.Thread(target=work) for _ in range(threads)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
        best = min(best, (clock() - t0) / (requests * threads))
    print(json.dumps({"us": best * 1e6}))


def profile(path: str, requests: int, sort: str, limit: int) -> None:
    import cProfile
    import pstats

    app = _app()
    for _ in range(200):
        _one(app, path)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(requests):
        _one(app, path)
    prof.disable()
    pstats.Stats(prof).sort_stats(sort).print_stats(limit)


def _run_child(name: str, dsn: str, path: str, requests: int, batches: int, threads: int) -> float:
    env = {**os.environ, DSN_VAR: dsn, APP_VAR: name, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "bench.inproc_django", "--child", "--path", path,
            "--requests", str(requests), "--batches", str(batches),
            "--threads", str(threads)]  # fmt: skip
    out = subprocess.run(argv, env=env, cwd=ROOT, check=True, capture_output=True, text=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["us"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inproc_django", description=__doc__)
    parser.add_argument("--apps", default=";".join(DEFAULT_APPS), help="separated by ;")
    parser.add_argument("--path", default="/select")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="request threads (gthread)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", metavar="NAME", help="cProfile one configuration")
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--limit", type=int, default=40)
    args = parser.parse_args(argv)
    if args.child:
        child(args.path, args.requests, args.batches, args.threads)
        return 0
    dsn = os.environ.get("POOLKIT_BENCH_DSN") or os.environ["POOLKIT_TEST_DSN"]
    if args.profile:
        os.environ.update({DSN_VAR: dsn, APP_VAR: args.profile})
        profile(args.path, args.requests, args.sort, args.limit)
        return 0
    names = [n.strip() for n in args.apps.split(";") if n.strip()]
    for name in names:
        if name not in APPS:
            parser.error(f"unknown configuration {name!r}; one of {', '.join(APPS)}")
    us: dict[str, list[float]] = {n: [] for n in names}
    for round_no in range(args.rounds):
        shift = round_no % len(names)
        for name in names[shift:] + names[:shift]:
            us[name].append(
                _run_child(name, dsn, args.path, args.requests, args.batches, args.threads)
            )
        print(
            f"# round {round_no + 1}: " + ", ".join(f"{n} {us[n][-1]:.0f} µs" for n in names),
            file=sys.stderr,
            flush=True,
        )
    base = names[-1]
    print(f"| configuration | µs/request (median, min-max) | vs {base} (time ratio) |")
    print("|---|---:|---:|")
    for name in names:
        ratios = [a / b for a, b in zip(us[name], us[base], strict=True)]
        print(
            f"| {name} | {statistics.median(us[name]):.0f} ({min(us[name]):.0f}-"
            f"{max(us[name]):.0f}) | {statistics.median(ratios):.3f} "
            f"({min(ratios):.3f}-{max(ratios):.3f}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
