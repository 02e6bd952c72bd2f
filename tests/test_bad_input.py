"""Bad settings fail at startup, naming the setting and the fix, and never showing the password.

One table across every way settings arrive: PoolConfig keywords, environment variables,
Django's DATABASES (a real ``django.setup()`` in a fresh process, as manage.py or gunicorn
would run it) and the FastAPI lifespan (a real app started with its lifespan).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from poolkit import AsyncPool, ConfigError, Pool, PoolConfig
from poolkit_fastapi import PoolLifespan

ROOT = Path(__file__).resolve().parents[1]
SECRET = "bad-input-secret-3e7a"
# Nothing listens on port 9 (discard): a connection attempt is refused at once.
URL = f"postgresql://app:{SECRET}@127.0.0.1:9/app"


@dataclass(frozen=True)
class Case:
    """One malformed setting: where it is given, what, and what the error must name."""

    where: str  # "PoolConfig", "env", "django" or "fastapi"
    given: Any  # keywords, environment, DATABASES entry items, or a lifespan factory
    setting: str  # named in the message (and ConfigError.setting, when it is one)
    fix: str  # a fragment of the fix the message must give


def _env(variables: dict[str, str]) -> dict[str, str]:
    """`variables` plus a DATABASE_URL, so that the case has one problem only."""
    return {"DATABASE_URL": URL, **variables}


def _lifespan(**kwargs: Any) -> Callable[[], PoolLifespan]:
    return lambda: PoolLifespan(**kwargs)


POOL = "DATABASES['default']['OPTIONS']['pool']"
CASES: dict[str, Case] = {
    # -- PoolConfig keywords --------------------------------------------------------------
    "min-above-max": Case("PoolConfig", {"min_size": 5, "max_size": 2}, "min_size",
                          "raise max_size or lower min_size"),
    "max-size-zero": Case("PoolConfig", {"max_size": 0}, "max_size", "use 1 or more"),
    "timeout-zero": Case("PoolConfig", {"timeout": 0}, "timeout",
                         "use the seconds a borrower may wait"),
    "timeout-string": Case("PoolConfig", {"timeout": "30"}, "timeout",
                           "use the seconds a borrower may wait"),
    "lifetime-nan": Case("PoolConfig", {"max_lifetime": float("nan")}, "max_lifetime",
                         "use the seconds after which a connection is replaced"),
    "leak-negative": Case("PoolConfig", {"leak_threshold": -1}, "leak_threshold",
                          "or None for off"),
    "reset-typo": Case("PoolConfig", {"reset": "discard"}, "reset", "did you mean 'discard_all'"),
    "validate-string": Case("PoolConfig", {"validate": "yes"}, "validate", "use True or False"),
    "name-empty": Case("PoolConfig", {"name": ""}, "name", "use a short non-empty label"),
    "kwargs-typo": Case("PoolConfig", {"kwargs": {"connect_timout": 5}},
                        "kwargs['connect_timout']", "did you mean 'connect_timeout'"),
    "kwargs-pool-setting": Case("PoolConfig", {"kwargs": {"min_size": 3}}, "kwargs['min_size']",
                                "pass min_size= to PoolConfig itself"),
    "url-driver-suffix": Case("PoolConfig",
                              {"conninfo": URL.replace("postgresql", "postgresql+psycopg")},
                              "conninfo", "start the URL with postgresql://"),
    "dsn-unparsable": Case("PoolConfig", {"conninfo": f"host=db password={SECRET} dbname"},
                           "conninfo", "key=value pairs such as"),
    "pgbouncer-discard": Case("PoolConfig", {"pgbouncer": True, "reset": "discard_all"}, "reset",
                              "use reset='auto' or 'none'"),
    # -- environment (PoolConfig.from_env) ------------------------------------------------
    "env-not-a-number": Case("env", _env({"POOLKIT_MAX_SIZE": "ten"}), "POOLKIT_MAX_SIZE",
                             "use 1 or more"),
    "env-typo": Case("env", _env({"POOLKIT_MIN_SIZ": "3"}), "POOLKIT_MIN_SIZ",
                     "did you mean 'POOLKIT_MIN_SIZE'"),
    "env-not-a-bool": Case("env", _env({"POOLKIT_VALIDATE": "maybe"}), "POOLKIT_VALIDATE",
                           "use 1/0, true/false"),
    "env-negative": Case("env", _env({"POOLKIT_TIMEOUT": "-1"}), "POOLKIT_TIMEOUT",
                         "use the seconds a borrower may wait"),
    "env-min-above-max": Case("env", _env({"POOLKIT_MIN_SIZE": "8", "POOLKIT_MAX_SIZE": "2"}),
                              "POOLKIT_MIN_SIZE", "raise max_size or lower min_size"),
    "env-kwargs": Case("env", _env({"POOLKIT_KWARGS": "connect_timeout=5"}), "POOLKIT_KWARGS",
                       "put them in DATABASE_URL as query parameters"),
    "env-url-scheme": Case("env", {"DATABASE_URL": URL.replace("postgresql", "mysql")},
                           "DATABASE_URL", "start the URL with postgresql://"),
    "env-password-var": Case("env", _env({"POOLKIT_PASSWORD": SECRET}), "POOLKIT_PASSWORD",
                             "settings look like POOLKIT_MIN_SIZE"),
    "env-no-database": Case("env", {"POOLKIT_MIN_SIZE": "2"}, "DATABASE_URL",
                            "set DATABASE_URL=postgresql://"),
    # -- Django DATABASES (django.setup() in a fresh process) -----------------------------
    "django-string-number": Case("django", {"OPTIONS": {"pool": {"min_size": "2"}}},
                                 f"{POOL}['min_size']", "use the connections to keep open"),
    "django-typo": Case("django", {"OPTIONS": {"pool": {"max_sise": 10}}},
                        f"{POOL}['max_sise']", "did you mean 'max_size'"),
    "django-conninfo": Case("django", {"OPTIONS": {"pool": {"conninfo": URL}}},
                            f"{POOL}['conninfo']", "set NAME, USER, PASSWORD, HOST and PORT"),
    "django-not-a-dict": Case("django", {"OPTIONS": {"pool": "yes"}}, POOL,
                              "must be True, False or a dict"),
    "django-open": Case("django", {"OPTIONS": {"pool": {"open": True}}}, f"{POOL}['open']",
                        "remove it"),
    "django-timeout-zero": Case("django", {"OPTIONS": {"pool": {"timeout": 0}}},
                                f"{POOL}['timeout']", "use the seconds a borrower may wait"),
    "django-min-above-max": Case("django", {"OPTIONS": {"pool": {"min_size": 9, "max_size": 3}}},
                                 f"{POOL}['min_size']", "raise max_size or lower min_size"),
    "django-kwargs": Case("django", {"OPTIONS": {"pool": {"kwargs": {"sslmode": "require"}}}},
                          f"{POOL}['kwargs']", "put connection arguments in"),
    "django-health-vs-validate": Case(
        "django", {"CONN_HEALTH_CHECKS": True, "OPTIONS": {"pool": {"validate": False}}},
        "DATABASES['default']['CONN_HEALTH_CHECKS']", "keep only one of them"),
    "django-two-problems": Case("django", {"OPTIONS": {"pool": {"max_sise": 10, "timeout": 0}}},
                                f"{POOL}['max_sise']", "did you mean 'max_size'"),
    "django-connect-arg-typo": Case("django", {"OPTIONS": {"connect_timout": 5}},
                                    "DATABASES['default']['OPTIONS']['connect_timout']",
                                    "did you mean 'connect_timeout'"),
    # -- FastAPI lifespan (a FastAPI app started with it) ---------------------------------
    "fastapi-retry-after": Case("fastapi", _lifespan(retry_after=-1), "retry_after", "use e.g. 1"),
    "fastapi-open-timeout": Case("fastapi", _lifespan(open_timeout=-5), "open_timeout",
                                 "use e.g. 10.0"),
    "fastapi-empty-name": Case("fastapi", _lifespan(pools={"": URL}), "pools['']",
                               "use e.g. 'replica'"),
    "fastapi-bad-source": Case("fastapi", _lifespan(pools={"default": 42}), "pools['default']",
                               "use a PoolConfig, a postgresql:// URL or a function"),
    "fastapi-sync-factory": Case("fastapi",
                                 _lifespan(pools=lambda: Pool(URL, open=False)),
                                 "pools['default']", "return an AsyncPool(..., open=False)"),
    "fastapi-same-name": Case("fastapi", _lifespan(pools={"a": PoolConfig(conninfo=URL, name="x"),
                                                          "b": PoolConfig(conninfo=URL, name="x")}),
                              "name", "give each PoolConfig a distinct name="),
    "fastapi-url-scheme": Case("fastapi",
                               _lifespan(pools=URL.replace("postgresql", "postgresql+asyncpg")),
                               "conninfo", "start the URL with postgresql://"),
    "fastapi-env": Case("fastapi", {"POOLKIT_MIN_SIZE": "abc"},
                        "POOLKIT_MIN_SIZE", "use the connections to keep open"),
    "fastapi-unreachable": Case("fastapi", _lifespan(pools=URL, open_timeout=1), "open_timeout",
                                "raise open_timeout (POOLKIT_OPEN_TIMEOUT)"),
}  # fmt: skip

# Known gaps: each one is a bug report; the marker goes away with the fix.
# Cases expected to fail for a known reason (strict xfail: fixing one turns it red).
KNOWN_GAPS: dict[str, str] = {}


@dataclass(frozen=True)
class Failure:
    kind: str  # the exception's qualified class name
    message: str
    text: str  # everything printed about it (message, repr, traceback)
    setting: str | None = None  # ConfigError.setting


def _failure(exc: BaseException) -> Failure:
    kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
    text = f"{exc}\n{exc!r}\n" + "".join(traceback.format_exception(exc))
    return Failure(kind, str(exc), text, getattr(exc, "setting", None))


def _start_fastapi(make: Callable[[], PoolLifespan]) -> None:
    async def go() -> None:
        # Constructing the lifespan is part of building the app, i.e. of startup.
        app = FastAPI(lifespan=make())
        async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30):
            pass

    asyncio.run(go())


_DJANGO_STARTUP = """
import json, sys, traceback
import django
from django.conf import settings
db = {"ENGINE": "poolkit_django", "NAME": "app", "USER": "app", "PASSWORD": sys.argv[2],
      "HOST": "127.0.0.1", "PORT": "9"}
db.update(json.loads(sys.argv[1]))
settings.configure(INSTALLED_APPS=["poolkit_django"], DATABASES={"default": db})
try:
    django.setup()
    from django.core.management import call_command
    call_command("check")
except Exception as exc:
    print(json.dumps({"kind": f"{type(exc).__module__}.{type(exc).__qualname__}",
                      "message": str(exc), "text": "".join(traceback.format_exception(exc))}))
else:
    print(json.dumps(None))
"""


def _start_django(entry: dict[str, Any]) -> Failure | None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POOLKIT_", "DJANGO_"))}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", _DJANGO_STARTUP, json.dumps(entry), SECRET],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
    result = json.loads(lines[-1])
    if result is None:
        return None
    return Failure(result["kind"], result["message"], result["text"] + proc.stderr)


def start(case: Case, monkeypatch: pytest.MonkeyPatch) -> Failure | None:
    """Start up with the case's setting; the failure it caused, or None."""
    for var in list(os.environ):
        if var == "DATABASE_URL" or (var.startswith("POOLKIT_") and "_TEST_" not in var):
            monkeypatch.delenv(var)
    try:
        if case.where == "PoolConfig":
            PoolConfig(**case.given)
        elif case.where == "env":
            PoolConfig.from_env(environ=case.given)
        elif case.where == "django":
            return _start_django(case.given)
        elif isinstance(case.given, dict):  # FastAPI configured from the environment
            for var, value in case.given.items():
                monkeypatch.setenv(var, value)
            _start_fastapi(PoolLifespan)
        else:
            _start_fastapi(case.given)
    except Exception as exc:
        return _failure(exc)
    return None


EXPECTED = {
    "PoolConfig": ("poolkit.ConfigError",),
    "env": ("poolkit.ConfigError",),
    "django": ("django.core.exceptions.ImproperlyConfigured",),
    "fastapi": ("poolkit.ConfigError", "poolkit_fastapi.PoolStartupError"),
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_GAPS[n], strict=True))
        if n in KNOWN_GAPS
        else n
        for n in CASES
    ],
)
def test_bad_setting_fails_at_startup(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES[name]
    failure = start(case, monkeypatch)
    assert failure is not None, f"{case.where} accepted {case.given!r} at startup"
    assert failure.kind in EXPECTED[case.where], failure.text
    assert case.setting in failure.message, failure.message
    assert case.fix in failure.message, failure.message
    if failure.setting is not None:
        assert failure.setting == case.setting
    assert SECRET not in failure.text, failure.text.replace(SECRET, "<SECRET>")


def test_the_table_covers_every_surface() -> None:
    assert len(CASES) >= 20
    assert {c.where for c in CASES.values()} == set(EXPECTED)
    assert all(sum(c.where == w for c in CASES.values()) >= 5 for w in EXPECTED)


def test_async_pool_rejects_what_poolconfig_rejects() -> None:
    """The pools validate through PoolConfig too: same error, raised at construction."""
    with pytest.raises(ConfigError, match="raise max_size or lower min_size"):
        AsyncPool(URL, min_size=5, max_size=2, open=False)
    with pytest.raises(ConfigError, match="raise max_size or lower min_size"):
        Pool(URL, min_size=5, max_size=2, open=False)
