"""The example shop's settings, with the chaos suite's pool settings, app name and logging.

Overrides only what the example does not read from the environment: OPTIONS["pool"]
(CHAOS_POOL, JSON), OPTIONS["application_name"] (CHAOS_APP_NAME) and LOGGING. With
CHAOS_REPLICA_URL (the failover runs) a "replica" alias and ReplicaRouter are added; the
primary's DATABASE_URL then names both hosts, so "default" follows a promotion.
"""

from __future__ import annotations

import json
import os

from psycopg.conninfo import conninfo_to_dict

from example_apps.django_app import settings as _example

globals().update({k: v for k, v in vars(_example).items() if k.isupper()})

DATABASES = {"default": {**_example.DATABASES["default"]}}
DATABASES["default"]["OPTIONS"] = {
    **_example.DATABASES["default"]["OPTIONS"],
    "application_name": os.environ["CHAOS_APP_NAME"],
    "pool": json.loads(os.environ["CHAOS_POOL"]),
}
_replica = os.environ.get("CHAOS_REPLICA_URL")
if _replica:
    _r = conninfo_to_dict(_replica)
    DATABASES["replica"] = {
        **DATABASES["default"],
        "HOST": _r.get("host", ""),
        "PORT": _r.get("port", ""),
        "OPTIONS": dict(DATABASES["default"]["OPTIONS"]),
        "TEST": {"MIRROR": "default"},
    }
    DATABASE_ROUTERS = ["poolkit_django.routers.ReplicaRouter"]
ROOT_URLCONF = "tests.chaos.django_app.urls"
# Every line, debug included for poolkit and psycopg, to stderr (the suite captures it).
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"}
    },
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["stderr"], "level": "INFO"},
    "loggers": {
        "poolkit": {"level": "DEBUG"},
        "psycopg": {"level": "DEBUG"},
        "django": {"level": "INFO"},
    },
}
