"""The example shop's settings, with the chaos suite's pool settings, app name and logging.

Overrides only what the example does not read from the environment: OPTIONS["pool"]
(CHAOS_POOL, JSON), OPTIONS["application_name"] (CHAOS_APP_NAME) and LOGGING.
"""

from __future__ import annotations

import json
import os

from example_apps.django_app import settings as _example

globals().update({k: v for k, v in vars(_example).items() if k.isupper()})

DATABASES = {"default": {**_example.DATABASES["default"]}}
DATABASES["default"]["OPTIONS"] = {
    **_example.DATABASES["default"]["OPTIONS"],
    "application_name": os.environ["CHAOS_APP_NAME"],
    "pool": json.loads(os.environ["CHAOS_POOL"]),
}
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
