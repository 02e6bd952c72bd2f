"""WSGI app for the fork test: gunicorn --preload imports it in the master, which queries first."""

import json
import os
from pathlib import Path

from django.core.wsgi import get_wsgi_application
from django.db import connection

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django.project.settings")
application = get_wsgi_application()

# The master borrows a connection and keeps it: the workers fork with it.
with connection.cursor() as cur:
    cur.execute("SELECT pg_backend_pid()")
    (backend,) = cur.fetchone()
Path(os.environ["PK_MASTER_FILE"]).write_text(json.dumps({"pid": os.getpid(), "backend": backend}))
