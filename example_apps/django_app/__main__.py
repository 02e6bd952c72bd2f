"""Migrate, then serve the example shop: ``python -m example_apps.django_app [--asgi] [--port N]``.

Uses $DATABASE_URL, or an embedded PostgreSQL in .poolkit/pgdata, stopped on exit unless
--keep-db. Serves with gunicorn (gthread workers) or, with --asgi, uvicorn.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

from example_apps._embedded_pg import ExampleServer
from poolkit import mask_conninfo

DATA_DIR = Path(".poolkit/pgdata")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m example_apps.django_app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8, help="gthread threads per worker")
    parser.add_argument("--asgi", action="store_true", help="serve with uvicorn instead")
    parser.add_argument(
        "--keep-db",
        action="store_true",
        help="leave the embedded PostgreSQL running on exit (the next start is faster)",
    )
    args = parser.parse_args(argv)

    embedded: ExampleServer | None = None
    if not os.environ.get("DATABASE_URL"):
        print(f"DATABASE_URL is not set: using an embedded PostgreSQL in {DATA_DIR}/", flush=True)
        embedded = ExampleServer(DATA_DIR, keep=args.keep_db)
        os.environ["DATABASE_URL"] = embedded.dsn
    try:
        _migrate()
        return _serve(args)
    finally:
        if embedded is not None:
            print(embedded.close(), flush=True)


def _migrate() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_apps.django_app.settings")
    import django
    from django.core.management import call_command
    from django.db import connections

    import poolkit_django

    django.setup()
    call_command("migrate", interactive=False)
    connections.close_all()
    for pool in poolkit_django.pools().values():
        pool.close()  # the server's workers open their own


def _serve(args: argparse.Namespace) -> int:
    from django.conf import settings

    if args.asgi:
        argv = ["uvicorn", "example_apps.django_app.asgi:application", "--host", args.host,
                "--port", str(args.port), "--workers", str(args.workers)]  # fmt: skip
    else:
        argv = ["gunicorn", "example_apps.django_app.wsgi:application",
                "--bind", f"{args.host}:{args.port}", "--workers", str(args.workers),
                "--worker-class", "gthread", "--threads", str(args.threads),
                *_no_control_socket()]  # fmt: skip
    base = f"http://{args.host}:{args.port}"
    print(f"database: {mask_conninfo(os.environ['DATABASE_URL'])}", flush=True)
    print(f"serving on {base}/ ({argv[0]}; Ctrl-C stops)", flush=True)
    print(f"  products:       {base}/products/", flush=True)
    if getattr(settings, "POOLKIT_DASHBOARD", False):
        print(
            f"  pool dashboard: {base}/poolkit/dashboard/  (POOLKIT_DASHBOARD=0 hides it)",
            flush=True,
        )
    print(f"  health:         {base}/poolkit/health    metrics: {base}/poolkit/metrics", flush=True)
    # A child, not exec: this process stays to stop the embedded server when it ends.
    child = subprocess.Popen([sys.executable, "-m", *argv])

    def forward(signum: int, frame: FrameType | None) -> None:
        # Ctrl-C reaches the whole process group already; SIGTERM (a supervisor, a test)
        # reaches only us: pass it on, then keep waiting for the server's graceful stop.
        if signum != signal.SIGINT and child.poll() is None:
            child.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    code = child.wait()
    return 0 if code in (0, -signal.SIGINT, -signal.SIGTERM) else code


def _no_control_socket() -> list[str]:
    # Recent gunicorn opens a control socket at one fixed path: two servers would share it.
    from gunicorn.config import KNOWN_SETTINGS

    known = any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS)
    return ["--no-control-socket"] if known else []


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
