"""WSGI entry point; under ``gunicorn --preload`` the master runs this, queries, then forks.

A master that touches the database before forking (here: applying the example's
migrations, as a deploy step might) is the case fork safety is for: the workers inherit
its open pool and sockets, and must rebuild rather than share them.
"""

import os

from django.core.management import call_command
from django.core.wsgi import get_wsgi_application
from django.db import connection

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.chaos.django_app.settings")
application = get_wsgi_application()
call_command("migrate", interactive=False, verbosity=0)
connection.close()
