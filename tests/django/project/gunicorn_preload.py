"""gunicorn config for the fork test: at shutdown the master queries through its own connection."""

import json
import os
from pathlib import Path


def on_exit(server):  # type: ignore[no-untyped-def]
    from django.db import connection

    try:
        with connection.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            result = {"backend": cur.fetchone()[0]}
    except Exception as exc:
        result = {"error": repr(exc)}
    Path(os.environ["PK_MASTER_FILE"] + ".exit").write_text(json.dumps(result))
