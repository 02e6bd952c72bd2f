"""Migrate, then serve the example shop: ``python -m example_apps.django_app [--asgi] [--port N]``.

Uses $DATABASE_URL, or an embedded PostgreSQL kept in .poolkit/pgdata (started on the
first run, reused afterwards). Serves with gunicorn (gthread workers) or, with --asgi,
uvicorn.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from example_apps._embedded_pg import ensure_server


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m example_apps.django_app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8, help="gthread threads per worker")
    parser.add_argument("--asgi", action="store_true", help="serve with uvicorn instead")
    args = parser.parse_args(argv)

    os.environ["DATABASE_URL"] = ensure_server(Path(".poolkit/pgdata"))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_apps.django_app.settings")
    import django
    from django.core.management import call_command
    from django.db import connections

    import poolkit_django

    django.setup()
    call_command("migrate", interactive=False)
    connections.close_all()
    for pool in poolkit_django.pools().values():
        pool.close()  # this process is replaced by the server below

    if args.asgi:
        argv = ["uvicorn", "example_apps.django_app.asgi:application", "--host", args.host,
                "--port", str(args.port), "--workers", str(args.workers)]  # fmt: skip
    else:
        argv = ["gunicorn", "example_apps.django_app.wsgi:application",
                "--bind", f"{args.host}:{args.port}", "--workers", str(args.workers),
                "--worker-class", "gthread", "--threads", str(args.threads),
                *_no_control_socket()]  # fmt: skip
    print(f"serving on http://{args.host}:{args.port}/ ({argv[0]})", flush=True)
    os.execv(sys.executable, [sys.executable, "-m", *argv])


def _no_control_socket() -> list[str]:
    # Recent gunicorn opens a control socket at one fixed path: two servers would share it.
    from gunicorn.config import KNOWN_SETTINGS

    known = any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS)
    return ["--no-control-socket"] if known else []


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
