"""PoolConfig validation, constructors and masking; no database needed."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
from typing import Any

import psycopg_pool
import pytest
from psycopg_pool import AsyncConnectionPool, ConnectionPool

import poolkit
from poolkit import ConfigError, PoolConfig, PoolkitError, mask_conninfo
from poolkit._config import UNSET

SECRET = "s3cr3t-Pa55"
URL = f"postgresql://app:{SECRET}@db.example:5432/app"


def assert_good_error(err: ConfigError, setting: str) -> None:
    """The error names the setting and value, says what to do, and leaks no password."""
    text = str(err)
    assert err.setting == setting
    assert text.startswith(f"{setting}={err.value!r}: "), text
    assert err.fix and text.endswith(f"; {err.fix}"), text
    for shown in (text, repr(err), repr(err.value)):
        assert SECRET not in shown


# -- defaults and the psycopg_pool contract ---------------------------------------------


def test_defaults() -> None:
    cfg = PoolConfig()
    assert (cfg.conninfo, dict(cfg.kwargs), cfg.min_size, cfg.max_size) == ("", {}, 4, None)
    assert cfg.resolved_max_size == 4
    assert cfg.name is None
    assert (cfg.timeout, cfg.max_waiting, cfg.num_workers) == (30.0, 0, 3)
    assert (cfg.max_lifetime, cfg.max_idle, cfg.reconnect_timeout) == (3600.0, 600.0, 300.0)
    assert (cfg.validate, cfg.validation_bypass) == (True, 0.5)
    assert (cfg.leak_threshold, cfg.leak_capture_stack) == (None, False)
    assert (cfg.reset, cfg.resolved_reset, cfg.pgbouncer) == ("auto", "auto", False)
    assert (cfg.drain_timeout, cfg.open_timeout, cfg.keepalive_interval) == (30.0, 30.0, None)
    assert cfg.prepare_threshold is UNSET
    assert cfg.connect_kwargs() == {}
    assert repr(cfg) == "PoolConfig()"


def test_defaults_match_psycopg_pool() -> None:
    pool = ConnectionPool(open=False)
    cfg = PoolConfig()
    for name in ("min_size", "max_size", "timeout", "max_waiting", "max_lifetime", "max_idle"):
        assert getattr(cfg, "resolved_max_size" if name == "max_size" else name) == getattr(
            pool, name
        )
    assert (cfg.reconnect_timeout, cfg.num_workers) == (pool.reconnect_timeout, pool.num_workers)


@pytest.mark.parametrize("pool_class", [ConnectionPool, AsyncConnectionPool])
@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"conninfo": URL, "min_size": 0, "max_size": 3, "name": "web"},
        {"conninfo": "host=localhost dbname=app", "kwargs": {"connect_timeout": 2}},
        {"pgbouncer": True, "autocommit": True, "application_name": "api", "timeout": 1},
        {"max_waiting": 5, "max_lifetime": 60, "max_idle": 10, "reconnect_timeout": 5},
    ],
)
def test_pool_kwargs_are_accepted_by_psycopg_pool(
    pool_class: type[ConnectionPool[Any]] | type[AsyncConnectionPool[Any]],
    settings: dict[str, Any],
) -> None:
    cfg = PoolConfig(**settings)
    pool = pool_class(**cfg.pool_kwargs(), open=False)
    assert (pool.min_size, pool.max_size) == (cfg.min_size, cfg.resolved_max_size)
    assert pool.kwargs == cfg.connect_kwargs()
    assert pool.conninfo == cfg.conninfo
    assert pool.timeout == cfg.timeout
    if cfg.name:
        assert pool.name == cfg.name


def test_pool_kwargs_keys() -> None:
    assert set(PoolConfig().pool_kwargs()) == {
        "conninfo",
        "kwargs",
        "min_size",
        "max_size",
        "name",
        "timeout",
        "max_waiting",
        "max_lifetime",
        "max_idle",
        "reconnect_timeout",
        "num_workers",
    }


# -- validation ---------------------------------------------------------------------------

BAD_SETTINGS: list[tuple[dict[str, Any], str]] = [
    ({"min_size": -1}, "min_size"),
    ({"min_size": "4"}, "min_size"),
    ({"min_size": 4.0}, "min_size"),
    ({"min_size": True}, "min_size"),
    ({"min_size": None}, "min_size"),
    ({"max_size": 0}, "max_size"),
    ({"max_size": -1}, "max_size"),
    ({"max_size": 2.5}, "max_size"),
    ({"max_size": "10"}, "max_size"),
    ({"min_size": 5, "max_size": 2}, "min_size"),
    ({"min_size": 0}, "min_size"),
    ({"min_size": 0, "max_size": 0}, "max_size"),
    ({"timeout": 0}, "timeout"),
    ({"timeout": -1.5}, "timeout"),
    ({"timeout": math.nan}, "timeout"),
    ({"timeout": "30"}, "timeout"),
    ({"timeout": True}, "timeout"),
    ({"timeout": None}, "timeout"),
    ({"max_waiting": -1}, "max_waiting"),
    ({"max_waiting": 1.5}, "max_waiting"),
    ({"max_lifetime": 0}, "max_lifetime"),
    ({"max_idle": 0}, "max_idle"),
    ({"reconnect_timeout": 0}, "reconnect_timeout"),
    ({"num_workers": 0}, "num_workers"),
    ({"num_workers": 1.0}, "num_workers"),
    ({"validation_bypass": -0.1}, "validation_bypass"),
    ({"validation_bypass": None}, "validation_bypass"),
    ({"leak_threshold": -1}, "leak_threshold"),
    ({"leak_threshold": "60"}, "leak_threshold"),
    ({"drain_timeout": -1}, "drain_timeout"),
    ({"open_timeout": 0}, "open_timeout"),
    ({"keepalive_interval": 0}, "keepalive_interval"),
    ({"keepalive_interval": -5}, "keepalive_interval"),
    ({"prepare_threshold": -1}, "prepare_threshold"),
    ({"prepare_threshold": 1.5}, "prepare_threshold"),
    ({"prepare_threshold": False}, "prepare_threshold"),
    ({"min_size": UNSET}, "min_size"),
    ({"validate": None}, "validate"),
    ({"validate": "yes"}, "validate"),
    ({"leak_capture_stack": 1}, "leak_capture_stack"),
    ({"pgbouncer": "true"}, "pgbouncer"),
    ({"autocommit": "on"}, "autocommit"),
    ({"application_name": 5}, "application_name"),
    ({"name": ""}, "name"),
    ({"name": 3}, "name"),
    ({"reset": "bogus"}, "reset"),
    ({"reset": 42}, "reset"),
    ({"reset": None}, "reset"),
    ({"kwargs": [("connect_timeout", 1)]}, "kwargs"),
    ({"kwargs": {1: "x"}}, "kwargs[1]"),
    ({"kwargs": {"connect_timout": 1}}, "kwargs['connect_timout']"),
    ({"kwargs": {"min_size": 1}}, "kwargs['min_size']"),
    ({"kwargs": {"autocommit": True}, "autocommit": False}, "kwargs['autocommit']"),
    ({"kwargs": {"application_name": "a"}, "application_name": "b"}, "kwargs['application_name']"),
    (
        {"kwargs": {"prepare_threshold": 5}, "prepare_threshold": None},
        "kwargs['prepare_threshold']",
    ),
    ({"conninfo": 42}, "conninfo"),
    ({"conninfo": "hello"}, "conninfo"),
]


@pytest.mark.parametrize(("settings", "setting"), BAD_SETTINGS)
def test_bad_setting_names_setting_value_and_fix(settings: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        PoolConfig(**settings)
    assert_good_error(info.value, setting)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"min_size": 5, "max_size": 2},
            "min_size=5: larger than max_size=2; raise max_size or lower min_size",
        ),
        ({"timeout": 0}, "timeout=0: must be greater than 0; "),
        ({"min_size": 4.0}, "min_size=4.0: must be an int, not float; "),
        ({"timeout": "30"}, "timeout='30': must be a number of seconds, not str; "),
        ({"max_size": 0}, "max_size=0: must be at least 1; "),
        ({"reset": "Auto"}, "did you mean 'auto'?"),
        ({"reset": "discard"}, "did you mean 'discard_all'?"),
        ({"kwargs": {"connect_timout": 1}}, "did you mean 'connect_timeout'?"),
        ({"kwargs": {"min_size": 1}}, "pass min_size= to PoolConfig itself"),
        ({"name": ""}, "name='': must be a non-empty str or None; "),
    ],
)
def test_error_messages(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        PoolConfig(**settings)
    assert message in str(info.value)


GOOD_SETTINGS: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"min_size": 0, "max_size": 1}, {"resolved_max_size": 1}),
    ({"min_size": 2}, {"max_size": None, "resolved_max_size": 2}),
    ({"min_size": 3, "max_size": 3}, {"resolved_max_size": 3}),
    ({"timeout": 5}, {"timeout": 5.0}),
    ({"max_waiting": 0}, {"max_waiting": 0}),
    ({"max_lifetime": math.inf}, {"max_lifetime": math.inf}),
    ({"validation_bypass": 0}, {"validation_bypass": 0.0}),
    ({"leak_threshold": 0}, {"leak_threshold": None}),
    ({"leak_threshold": 60}, {"leak_threshold": 60.0}),
    ({"drain_timeout": 0}, {"drain_timeout": 0.0}),
    ({"open_timeout": None}, {"open_timeout": None}),
    ({"keepalive_interval": 30}, {"keepalive_interval": 30.0}),
    ({"prepare_threshold": 0}, {"prepare_threshold": 0}),
    ({"prepare_threshold": None}, {"prepare_threshold": None}),
    ({"autocommit": False}, {"autocommit": False}),
    ({"application_name": ""}, {"application_name": ""}),
    ({"reset": "discard_all"}, {"resolved_reset": "discard_all"}),
    ({"reset": "none", "pgbouncer": True}, {"resolved_reset": "none"}),
]


@pytest.mark.parametrize(("settings", "expected"), GOOD_SETTINGS)
def test_good_setting(settings: dict[str, Any], expected: dict[str, Any]) -> None:
    cfg = PoolConfig(**settings)
    for attr, value in expected.items():
        assert getattr(cfg, attr) == value
        assert type(getattr(cfg, attr)) is type(value)


def test_callable_reset() -> None:
    def reset(conn: object) -> None:
        pass

    assert PoolConfig(reset=reset).resolved_reset is reset
    assert PoolConfig(reset=reset, pgbouncer=True).resolved_reset is reset


def test_settings_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        PoolConfig(URL)  # type: ignore[call-arg]


# -- connection strings and masking -----------------------------------------------------


@pytest.mark.parametrize(
    "conninfo",
    [
        "",
        URL,
        f"postgres://app:{SECRET}@db.example/app",
        "postgresql:///app?host=/var/run/postgresql",
        f"host=db.example port=5432 dbname=app user=app password={SECRET}",
        "postgresql://h1:5432,h2:5433/app?target_session_attrs=read-write",
    ],
)
def test_valid_conninfo(conninfo: str) -> None:
    cfg = PoolConfig(conninfo=conninfo)
    assert cfg.conninfo == conninfo
    assert SECRET not in repr(cfg) and SECRET not in str(cfg)
    assert SECRET not in cfg.masked_conninfo


@pytest.mark.parametrize(
    ("conninfo", "problem"),
    [
        (f"postgresql://app:{SECRET}%zz@h/db", "invalid percent-encoded token"),
        (f"postgresql://app:{SECRET} x@h/db", "unexpected spaces"),
        (f"postgresql://h/db?password={SECRET} x", "unexpected spaces"),
        (f"postgresql://app:{SECRET}@h/db?bogus=1", "invalid URI query parameter"),
        (f"postgresql://app:{SECRET}@[::1/db", "IPv6"),
        (f"password='{SECRET}", "unterminated quoted string"),
        (f"password={SECRET} dbname", 'missing "="'),
        (f"host=h password={SECRET} nosuchoption=1", "invalid connection option"),
        (f"mysql://app:{SECRET}@h/db", "'mysql'"),
        (f"postgresql+psycopg://app:{SECRET}@h/db", "'postgresql+psycopg'"),
    ],
)
def test_malformed_conninfo_is_masked(conninfo: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        PoolConfig(conninfo=conninfo)
    err = info.value
    assert_good_error(err, "conninfo")
    assert problem in err.problem
    assert "postgresql://" in err.fix
    # The unmasked libpq error must not travel along as the cause or context.
    assert err.__cause__ is None and err.__context__ is None


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (URL, "postgresql://app:***@db.example:5432/app"),
        ("postgresql://app@h/db", "postgresql://app@h/db"),
        ("postgresql://h:5432/db", "postgresql://h:5432/db"),
        ("postgresql://app:@h/db", "postgresql://app:@h/db"),
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:p/ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:a:b@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:my secret@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:pw@h/db as bob@x", "postgresql://u:***@h/db as bob@x"),
        (
            "postgresql://h/db?password=x&sslpassword=y&host=z",
            "postgresql://h/db?password=***&sslpassword=***&host=z",
        ),
        ("host=h password=x port=1", "host=h password=*** port=1"),
        ("host=h password = 'a b\\'c' port=1", "host=h password = *** port=1"),
        ("host=h password='unterminated", "host=h password=***"),
        ("host=h password=a\\ b port=1", "host=h password=*** port=1"),
        ("sslpassword=x scram_client_key=y", "sslpassword=*** scram_client_key=***"),
        ("PASSWORD=x", "PASSWORD=***"),
        ("user=passworder dbname=app", "user=passworder dbname=app"),
        (
            "connect to postgres://bob:hunter2@db/app failed",
            "connect to postgres://bob:***@db/app failed",
        ),
        ("", ""),
    ],
)
def test_mask_conninfo(text: str, masked: str) -> None:
    assert mask_conninfo(text) == masked


@pytest.mark.parametrize("weird", [None, 42, b"postgresql://u:pw@h", object()])
def test_mask_conninfo_never_raises(weird: Any) -> None:
    assert "pw@" not in mask_conninfo(weird)


def test_repr_masks_every_password() -> None:
    cfg = PoolConfig(
        conninfo=f"host=h password={SECRET}",
        kwargs={"password": SECRET, "sslpassword": SECRET, "dbname": URL, "sslmode": "require"},
        min_size=2,
    )
    for text in (repr(cfg), str(cfg), f"{cfg}", cfg.masked_conninfo):
        assert SECRET not in text
    assert repr(cfg) == (
        "PoolConfig(conninfo='host=h password=***', kwargs={'password': '***', "
        "'sslpassword': '***', 'dbname': 'postgresql://app:***@db.example:5432/app', "
        "'sslmode': 'require'}, min_size=2)"
    )
    assert cfg.connect_kwargs()["password"] == SECRET  # masking is for display only


# -- kwargs and connect_kwargs ------------------------------------------------------------


def test_kwargs_are_a_read_only_copy() -> None:
    source = {"connect_timeout": 5}
    cfg = PoolConfig(kwargs=source)
    source["connect_timeout"] = 99
    assert cfg.kwargs["connect_timeout"] == 5
    with pytest.raises(TypeError):
        cfg.kwargs["connect_timeout"] = 1  # type: ignore[index]
    cfg.connect_kwargs()["connect_timeout"] = 1
    assert cfg.kwargs["connect_timeout"] == 5


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, {}),
        ({"autocommit": True}, {"autocommit": True}),
        ({"application_name": "api"}, {"application_name": "api"}),
        ({"prepare_threshold": None}, {"prepare_threshold": None}),
        ({"prepare_threshold": 3}, {"prepare_threshold": 3}),
        ({"kwargs": {"autocommit": True}}, {"autocommit": True}),
        (
            {"kwargs": {"row_factory": None, "options": "-c x=1"}},
            {"row_factory": None, "options": "-c x=1"},
        ),
        ({"pgbouncer": True}, {"prepare_threshold": None}),
        ({"pgbouncer": True, "prepare_threshold": 5}, {"prepare_threshold": 5}),
        ({"pgbouncer": True, "kwargs": {"prepare_threshold": 5}}, {"prepare_threshold": 5}),
    ],
)
def test_connect_kwargs(settings: dict[str, Any], expected: dict[str, Any]) -> None:
    assert PoolConfig(**settings).connect_kwargs() == expected


# -- PgBouncer ----------------------------------------------------------------------------


def test_pgbouncer_defaults() -> None:
    cfg = PoolConfig(pgbouncer=True)
    assert cfg.reset == "auto" and cfg.resolved_reset == "none"
    assert cfg.connect_kwargs() == {"prepare_threshold": None}
    # The raw fields are kept, so turning pgbouncer off restores the ordinary defaults.
    off = cfg.replace(pgbouncer=False)
    assert off.resolved_reset == "auto" and off.connect_kwargs() == {}


@pytest.mark.parametrize("reset", ["discard_all", "reset_all"])
def test_pgbouncer_rejects_session_reset(reset: str) -> None:
    with pytest.raises(ConfigError) as info:
        PoolConfig(pgbouncer=True, reset=reset)
    assert_good_error(info.value, "reset")
    assert "PgBouncer" in str(info.value) and "session" in str(info.value)
    assert "pgbouncer=False" in info.value.fix


# -- from_url -----------------------------------------------------------------------------


def test_from_url() -> None:
    cfg = PoolConfig.from_url(URL, min_size=1, max_size=5)
    assert (cfg.conninfo, cfg.min_size, cfg.max_size) == (URL, 1, 5)


def test_from_url_bad_url() -> None:
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_url(f"postgres://u:{SECRET}%@h")
    assert_good_error(info.value, "conninfo")


# -- from_env -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, {}),
        ({"DATABASE_URL": URL}, {"conninfo": URL}),
        ({"DATABASE_URL": f" {URL}\n"}, {"conninfo": URL}),
        (
            {"POOLKIT_CONNINFO": "host=h\n", "POOLKIT_NAME": " web "},
            {"conninfo": "host=h", "name": "web"},
        ),
        ({"DATABASE_URL": URL, "POOLKIT_CONNINFO": "host=x"}, {"conninfo": "host=x"}),
        ({"POOLKIT_MIN_SIZE": "2", "POOLKIT_MAX_SIZE": " 8 "}, {"min_size": 2, "max_size": 8}),
        ({"POOLKIT_MAX_SIZE": "none"}, {"max_size": None}),
        ({"POOLKIT_MAX_SIZE": ""}, {"max_size": None}),
        ({"POOLKIT_TIMEOUT": "2.5"}, {"timeout": 2.5}),
        ({"POOLKIT_TIMEOUT": "3"}, {"timeout": 3.0}),
        ({"POOLKIT_LEAK_THRESHOLD": "None"}, {"leak_threshold": None}),
        ({"POOLKIT_LEAK_THRESHOLD": "0"}, {"leak_threshold": None}),
        ({"POOLKIT_OPEN_TIMEOUT": "none"}, {"open_timeout": None}),
        ({"POOLKIT_PREPARE_THRESHOLD": "none"}, {"prepare_threshold": None}),
        ({"POOLKIT_PREPARE_THRESHOLD": "0"}, {"prepare_threshold": 0}),
        ({"POOLKIT_AUTOCOMMIT": "none"}, {"autocommit": None}),
        (
            {"POOLKIT_NAME": "web", "POOLKIT_APPLICATION_NAME": "api"},
            {"name": "web", "application_name": "api"},
        ),
        ({"POOLKIT_RESET": "discard_all"}, {"reset": "discard_all"}),
        ({"POOLKIT_TEST_DSN": "host=elsewhere"}, {"conninfo": ""}),
    ]
    + [({"POOLKIT_VALIDATE": word}, {"validate": True}) for word in ["1", "true", "YES", "On"]]
    + [({"POOLKIT_PGBOUNCER": word}, {"pgbouncer": False}) for word in ["0", "False", "no", "off"]],
)
def test_from_env(environ: dict[str, str], expected: dict[str, Any]) -> None:
    # PGHOST names a server, so an empty conninfo is allowed (see test_config_errors.py).
    cfg = PoolConfig.from_env({"PGHOST": "db.example", **environ})
    for attr, value in expected.items():
        assert getattr(cfg, attr) == value


def test_from_env_every_setting_but_kwargs_has_a_variable() -> None:
    environ = {
        "POOLKIT_CONNINFO": "host=h",
        "POOLKIT_AUTOCOMMIT": "1",
        "POOLKIT_APPLICATION_NAME": "a",
        "POOLKIT_PREPARE_THRESHOLD": "3",
        "POOLKIT_MIN_SIZE": "1",
        "POOLKIT_MAX_SIZE": "2",
        "POOLKIT_NAME": "n",
        "POOLKIT_TIMEOUT": "1",
        "POOLKIT_MAX_WAITING": "1",
        "POOLKIT_MAX_LIFETIME": "1",
        "POOLKIT_MAX_IDLE": "1",
        "POOLKIT_RECONNECT_TIMEOUT": "1",
        "POOLKIT_NUM_WORKERS": "1",
        "POOLKIT_VALIDATE": "0",
        "POOLKIT_VALIDATION_BYPASS": "1",
        "POOLKIT_LEAK_THRESHOLD": "1",
        "POOLKIT_LEAK_CAPTURE_STACK": "1",
        "POOLKIT_RESET": "none",
        "POOLKIT_DRAIN_TIMEOUT": "1",
        "POOLKIT_OPEN_TIMEOUT": "1",
        "POOLKIT_KEEPALIVE_INTERVAL": "1",
        "POOLKIT_PGBOUNCER": "1",
        "POOLKIT_LEND_ORDER": "fifo",
    }
    fields = {f.name for f in dataclasses.fields(PoolConfig)} - {"kwargs"}
    assert {var.removeprefix("POOLKIT_").lower() for var in environ} == fields
    cfg = PoolConfig.from_env(environ)
    assert all(getattr(cfg, name) != getattr(PoolConfig(), name) for name in fields)


@pytest.mark.parametrize(
    ("environ", "setting", "fragment"),
    [
        ({"POOLKIT_MIN_SIZE": "abc"}, "POOLKIT_MIN_SIZE", "POOLKIT_MIN_SIZE='abc': is not a whole"),
        ({"POOLKIT_MIN_SIZE": "4.0"}, "POOLKIT_MIN_SIZE", "not a whole number"),
        ({"POOLKIT_MIN_SIZE": ""}, "POOLKIT_MIN_SIZE", "not a whole number"),
        ({"POOLKIT_TIMEOUT": "30s"}, "POOLKIT_TIMEOUT", "POOLKIT_TIMEOUT='30s': is not a number"),
        ({"POOLKIT_VALIDATE": "maybe"}, "POOLKIT_VALIDATE", "on/off"),
        ({"POOLKIT_VALIDATE": "none"}, "POOLKIT_VALIDATE", "is not a boolean"),
        ({"POOLKIT_MIN_SIZE": "-1"}, "POOLKIT_MIN_SIZE", "POOLKIT_MIN_SIZE=-1: must be at least 0"),
        ({"POOLKIT_MIN_SIZE": "5", "POOLKIT_MAX_SIZE": "2"}, "POOLKIT_MIN_SIZE", "max_size=2"),
        ({"POOLKIT_TIMEOUT": "nan"}, "POOLKIT_TIMEOUT", "greater than 0"),
        ({"POOLKIT_RESET": "discard"}, "POOLKIT_RESET", "did you mean 'discard_all'?"),
        ({"POOLKIT_MINSIZE": "3"}, "POOLKIT_MINSIZE", "did you mean 'POOLKIT_MIN_SIZE'?"),
        ({"POOLKIT_TIMEOUTS": "3"}, "POOLKIT_TIMEOUTS", "did you mean 'POOLKIT_TIMEOUT'?"),
        ({"POOLKIT_FOO": "3"}, "POOLKIT_FOO", "remove it"),
        ({"POOLKIT_KWARGS": "{}"}, "POOLKIT_KWARGS", "DATABASE_URL as query parameters"),
        ({"DATABASE_URL": f"postgresql://u:{SECRET}%zz@h"}, "DATABASE_URL", "percent-encoded"),
        ({"POOLKIT_CONNINFO": f"password='{SECRET}"}, "POOLKIT_CONNINFO", "unterminated"),
        ({"POOLKIT_PASSWORD": SECRET}, "POOLKIT_PASSWORD", "POOLKIT_PASSWORD='***'"),
    ],
)
def test_from_env_errors_name_the_variable(
    environ: dict[str, str], setting: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_env({"PGHOST": "db.example", **environ})
    assert_good_error(info.value, setting)
    assert fragment in str(info.value)


def test_from_env_overrides_win_and_keep_field_names() -> None:
    environ = {"DATABASE_URL": URL, "POOLKIT_MIN_SIZE": "8"}
    cfg = PoolConfig.from_env(environ, min_size=1, kwargs={"connect_timeout": 3})
    assert (cfg.conninfo, cfg.min_size, dict(cfg.kwargs)) == (URL, 1, {"connect_timeout": 3})
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_env(environ, min_size=-1)
    assert_good_error(info.value, "min_size")


def test_from_env_prefix_and_url_var() -> None:
    environ = {"APP_DB_URL": URL, "APP_DB_MIN_SIZE": "1", "DATABASE_URL": "host=other"}
    cfg = PoolConfig.from_env(environ, prefix="APP_DB_", url_var="APP_DB_URL")
    assert (cfg.conninfo, cfg.min_size) == (URL, 1)
    assert PoolConfig.from_env({"DATABASE_URL": URL, "PGHOST": "h"}, url_var=None).conninfo == ""
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_env({}, prefix="")
    assert_good_error(info.value, "prefix")


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", URL)
    monkeypatch.setenv("POOLKIT_MAX_SIZE", "9")
    cfg = PoolConfig.from_env()
    assert (cfg.conninfo, cfg.max_size) == (URL, 9)


# -- from_dict ----------------------------------------------------------------------------

SOURCE = "DATABASES['default']['OPTIONS']['pool']"


def test_from_dict() -> None:
    cfg = PoolConfig.from_dict({"min_size": 2, "max_size": 10, "timeout": 5, "name": "db"})
    assert (cfg.min_size, cfg.max_size, cfg.timeout, cfg.name) == (2, 10, 5.0, "db")


@pytest.mark.parametrize(
    ("options", "validate"),
    [
        ({"check": ConnectionPool.check_connection}, True),
        ({"check": AsyncConnectionPool.check_connection}, True),
        ({"check": None}, False),
        ({"validate": False}, False),
    ],
)
def test_from_dict_accepts_psycopg_pool_check(options: dict[str, Any], validate: bool) -> None:
    assert PoolConfig.from_dict(options).validate is validate


def test_from_dict_accepts_psycopg_pool_reset_callable() -> None:
    def reset(conn: object) -> None:
        pass

    assert PoolConfig.from_dict({"reset": reset}).reset is reset


@pytest.mark.parametrize(
    ("options", "key", "fragment"),
    [
        ({"min_size": "4"}, "['min_size']", "must be an int, not str"),
        ({"timeout": "30"}, "['timeout']", "must be a number of seconds, not str"),
        ({"validate": "true"}, "['validate']", "must be a bool"),
        ({"minsize": 4}, "['minsize']", "did you mean 'min_size'?"),
        ({"max_lifetme": 4}, "['max_lifetme']", "did you mean 'max_lifetime'?"),
        ({"bogus": 1}, "['bogus']", "is not a pool setting; remove it"),
        ({1: 1}, "[1]", "is not a pool setting"),
        ({"min_size": 5, "max_size": 2}, "['min_size']", "larger than max_size=2"),
        ({"kwargs": {"passwrd": SECRET}}, "['kwargs']['passwrd']", "did you mean 'password'?"),
        ({"conninfo": f"password='{SECRET}"}, "['conninfo']", "unterminated"),
        ({"check": lambda conn: None}, "['check']", "'validate': True"),
        ({"check": None, "validate": True}, "['validate']", "conflicts with"),
        ({"open": True}, "['open']", "opens the pool"),
        ({"configure": print}, "['configure']", "application_name"),
        ({"connection_class": object}, "['connection_class']", "sets itself"),
        ({"close_returns": True}, "['close_returns']", "sets itself"),
        ({"reconnect_failed": print}, "['reconnect_failed']", "sets itself"),
        ({"password": SECRET}, "['password']", "['password']='***'"),
    ],
)
def test_from_dict_errors_name_the_key(options: dict[Any, Any], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_dict(options, source=SOURCE)
    assert_good_error(info.value, SOURCE + key)
    assert fragment in str(info.value)


def test_from_dict_default_source_and_non_mapping() -> None:
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_dict({"min_size": -1})
    assert_good_error(info.value, "pool options['min_size']")
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_dict(True, source=SOURCE)  # type: ignore[arg-type]
    assert_good_error(info.value, SOURCE)


# -- immutability, copies, equality --------------------------------------------------------


def test_frozen_and_slotted() -> None:
    cfg = PoolConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.min_size = 1  # type: ignore[misc]
    assert not hasattr(cfg, "__dict__")


def test_replace_validates_again() -> None:
    cfg = PoolConfig(min_size=2, max_size=4, kwargs={"connect_timeout": 1})
    bigger = cfg.replace(max_size=8)
    assert (cfg.max_size, bigger.max_size, bigger.kwargs) == (4, 8, cfg.kwargs)
    with pytest.raises(ConfigError) as info:
        cfg.replace(min_size=10)
    assert_good_error(info.value, "min_size")
    with pytest.raises(ConfigError) as info:
        cfg.replace(min_sise=1)
    assert_good_error(info.value, "min_sise")
    assert info.value.fix == "did you mean 'min_size'?"


def test_equality_hash_pickle_and_copy() -> None:
    cfg = PoolConfig(conninfo=URL, kwargs={"connect_timeout": 3}, min_size=1, pgbouncer=True)
    same = PoolConfig(conninfo=URL, kwargs={"connect_timeout": 3}, min_size=1, pgbouncer=True)
    assert cfg == same and hash(cfg) == hash(same)
    assert cfg != cfg.replace(kwargs={"connect_timeout": 4})
    assert {cfg: 1}[same] == 1
    for clone in (pickle.loads(pickle.dumps(cfg)), copy.copy(cfg), copy.deepcopy(cfg)):
        assert clone == cfg
        with pytest.raises(TypeError):
            clone.kwargs["x"] = 1  # type: ignore[index]


# -- errors -------------------------------------------------------------------------------


def test_error_classes() -> None:
    assert issubclass(ConfigError, PoolkitError) and issubclass(ConfigError, ValueError)
    assert ConfigError.__module__ == PoolkitError.__module__ == "poolkit"
    assert poolkit.PoolTimeout is psycopg_pool.PoolTimeout
    assert poolkit.PoolClosed is psycopg_pool.PoolClosed
    assert poolkit.TooManyRequests is psycopg_pool.TooManyRequests


def test_config_error_fields_and_pickle() -> None:
    err = ConfigError("min_size", 5, "larger than max_size=2", "raise max_size or lower min_size")
    assert str(err) == "min_size=5: larger than max_size=2; raise max_size or lower min_size"
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.setting, clone.value, clone.problem, clone.fix, str(clone)) == (
        err.setting,
        err.value,
        err.problem,
        err.fix,
        str(err),
    )


def test_public_names() -> None:
    for name in (
        "PoolConfig",
        "ConfigError",
        "PoolkitError",
        "PoolTimeout",
        "PoolClosed",
        "TooManyRequests",
        "mask_conninfo",
    ):
        assert name in poolkit.__all__
        assert hasattr(poolkit, name)
    assert PoolConfig.__module__ == "poolkit._config"
