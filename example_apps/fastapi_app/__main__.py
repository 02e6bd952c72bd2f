"""Run the notes API with uvicorn, on $DATABASE_URL or an embedded PostgreSQL."""

from __future__ import annotations

import argparse
import os
import socket
import sys

import uvicorn

from example_apps._embedded_pg import ensure_server
from poolkit import mask_conninfo

from .app import DASHBOARD_PREFIX, DATA_DIR, create_app, dashboard_enabled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m example_apps.fastapi_app", description=__doc__)
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    args = parser.parse_args(argv)

    url = os.environ.get("DATABASE_URL")
    if not url:
        print(f"DATABASE_URL is not set: using an embedded PostgreSQL in {DATA_DIR}/", flush=True)
        url = ensure_server(DATA_DIR)
    # Bound here, before uvicorn starts, so the printed URL is right even with --port 0.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.create_server((args.host, args.port), family=family)
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    print(f"database: {mask_conninfo(url)}", flush=True)
    print(f"serving on http://{host}:{port} (API docs: http://{host}:{port}/docs)", flush=True)
    if dashboard_enabled():
        print(f"pool dashboard: http://{host}:{port}{DASHBOARD_PREFIX}/", flush=True)
    config = uvicorn.Config(create_app(url), log_level="info", timeout_graceful_shutdown=30)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
