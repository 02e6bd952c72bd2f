"""Run the notes API with uvicorn, on $DATABASE_URL or an embedded PostgreSQL."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from types import FrameType

import uvicorn

from example_apps._embedded_pg import ExampleServer
from poolkit import mask_conninfo

from .app import DASHBOARD_PREFIX, DATA_DIR, create_app, dashboard_enabled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m example_apps.fastapi_app", description=__doc__)
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument(
        "--keep-db",
        action="store_true",
        help="leave the embedded PostgreSQL running on exit (the next start is faster)",
    )
    args = parser.parse_args(argv)
    # uvicorn re-raises Ctrl-C/SIGTERM once it has shut down: end quietly, through the
    # `finally` below that stops the embedded server.
    signal.signal(signal.SIGINT, _quiet_exit)
    signal.signal(signal.SIGTERM, _quiet_exit)

    url = os.environ.get("DATABASE_URL")
    embedded: ExampleServer | None = None
    if not url:
        print(f"DATABASE_URL is not set: using an embedded PostgreSQL in {DATA_DIR}/", flush=True)
        embedded = ExampleServer(DATA_DIR, keep=args.keep_db)
        url = embedded.dsn
    try:
        return _serve(url, args.host, args.port)
    finally:
        if embedded is not None:
            print(embedded.close(), flush=True)


def _quiet_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _serve(url: str, host: str, port: int) -> int:
    # Bound here, before uvicorn starts, so the printed URL is right even with --port 0.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family)
    port = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    base = f"http://{shown}:{port}"
    print(f"database: {mask_conninfo(url)}", flush=True)
    print(f"serving on {base} (Ctrl-C stops)", flush=True)
    print(f"  API docs:       {base}/docs", flush=True)
    if dashboard_enabled():
        print(
            f"  pool dashboard: {base}{DASHBOARD_PREFIX}/  (POOLKIT_DASHBOARD=0 hides it)",
            flush=True,
        )
    print(f"  readiness:      {base}/ready    metrics: {base}/metrics", flush=True)
    config = uvicorn.Config(create_app(url), log_level="info", timeout_graceful_shutdown=30)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
