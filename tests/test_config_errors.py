"""ConfigError across every way settings arrive: unknown keys, all problems at once, defaults named.

No database needed: pools are built with open=False.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from typing import Any

import pytest

from poolkit import AsyncPool, ConfigError, Pool, PoolConfig
from poolkit._config import config_for_pool

SECRET = "s3cr3t-Pa55-errors"
URL = f"postgresql://app:{SECRET}@db.example:5432/app"
ENV = {"DATABASE_URL": URL}


def no_secret(err: ConfigError) -> None:
    for text in (str(err), repr(err), *(str(p) for p in err.problems), repr(err.value)):
        assert SECRET not in text


# -- an unknown key is the same ConfigError everywhere, with a did-you-mean -----------------

UNKNOWN: dict[str, tuple[Callable[[], object], str]] = {
    "from_url": (lambda: PoolConfig.from_url(URL, max_sise=3), "max_sise"),
    "from_dict": (lambda: PoolConfig.from_dict({"max_sise": 3}), "pool options['max_sise']"),
    "from_env": (lambda: PoolConfig.from_env({**ENV, "POOLKIT_MAX_SISE": "3"}), "POOLKIT_MAX_SISE"),
    "from_env-override": (lambda: PoolConfig.from_env(ENV, max_sise=3), "max_sise"),
    "replace": (lambda: PoolConfig(conninfo=URL).replace(max_sise=3), "max_sise"),
    "config_for_pool": (
        lambda: config_for_pool("Pool", URL, None, None, None, {"max_sise": 3}),
        "max_sise",
    ),
    "config_for_pool-config": (
        lambda: config_for_pool("Pool", "", PoolConfig(conninfo=URL), None, None, {"max_sise": 3}),
        "max_sise",
    ),
    "Pool": (lambda: Pool(URL, max_sise=3, open=False), "max_sise"),
    "AsyncPool": (lambda: AsyncPool(URL, max_sise=3, open=False), "max_sise"),
    "Pool-config": (
        lambda: Pool(config=PoolConfig(conninfo=URL), max_sise=3, open=False),
        "max_sise",
    ),
    "AsyncPool-config": (
        lambda: AsyncPool(config=PoolConfig(conninfo=URL), max_sise=3, open=False),
        "max_sise",
    ),
}
# Pool(url, **settings) names the key as written.
POOL_LABELS = {"Pool": "max_sise", "AsyncPool": "max_sise"}


@pytest.mark.parametrize("way", UNKNOWN)
def test_unknown_key_is_a_config_error_with_did_you_mean(way: str) -> None:
    make, setting = UNKNOWN[way]
    with pytest.raises(ConfigError) as info:
        make()
    err = info.value
    assert err.setting in (setting, POOL_LABELS.get(way))
    if way == "from_env":  # the environment's own spelling
        assert (err.value, err.problem, err.fix) == ("3", _UNKNOWN_TEXT[0], _UNKNOWN_ENV_FIX)
    else:
        assert (err.value, err.problem, err.fix) == (3, *_UNKNOWN_TEXT)
    assert str(err) == f"{err.setting}={err.value!r}: {err.problem}; {err.fix}"
    assert err.problems == [err]


_UNKNOWN_TEXT = ("is not a pool setting", "did you mean 'max_size'?")
_UNKNOWN_ENV_FIX = "did you mean 'POOLKIT_MAX_SIZE'?"


def test_unknown_key_without_a_close_match() -> None:
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_url(URL, colour="blue")
    assert str(info.value) == "colour='blue': is not a pool setting; remove it"


def test_from_url_conninfo_given_twice() -> None:
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_url(URL, conninfo="host=other")
    assert info.value.setting == "conninfo"
    assert "keep only one" in info.value.fix


def test_replace_accepts_psycopg_pool_names_like_from_dict() -> None:
    cfg = PoolConfig(conninfo=URL)
    assert cfg.replace(check=None).validate is False
    with pytest.raises(ConfigError, match="sets itself"):
        cfg.replace(connection_class=object)


# -- every problem at once ------------------------------------------------------------------


def test_every_bad_value_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        PoolConfig(conninfo=URL, min_size=-1, timeout=0, reset="bogus", kwargs={"passwrd": 1})
    err = info.value
    assert [p.setting for p in err.problems] == [
        "kwargs['passwrd']",
        "min_size",
        "timeout",
        "reset",
    ]
    # The error's own fields are the first problem's.
    first = err.problems[0]
    assert (err.setting, err.value, err.problem, err.fix) == (
        first.setting,
        first.value,
        first.problem,
        first.fix,
    )
    lines = str(err).splitlines()
    assert lines[0] == "4 problems with the pool settings:"
    assert lines[1:] == [f"  - {p}" for p in err.problems]
    assert "did you mean 'password'?" in lines[1]
    assert all(p.problems == [p] for p in err.problems)
    no_secret(err)


def test_related_checks_run_only_on_valid_values() -> None:
    # max_size="2" is wrong by itself; comparing it to min_size would only add noise.
    with pytest.raises(ConfigError) as info:
        PoolConfig(min_size=5, max_size="2")  # type: ignore[arg-type]
    assert [p.setting for p in info.value.problems] == ["max_size"]


def test_from_dict_reports_unknown_keys_and_bad_values_together() -> None:
    source = "DATABASES['default']['OPTIONS']['pool']"
    options = {"max_sise": 10, "timeout": "30", "min_size": 5, "max_size": 2, "conninfo": URL}
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_dict(options, source=source)
    assert [p.setting for p in info.value.problems] == [
        f"{source}['max_sise']",
        f"{source}['min_size']",
        f"{source}['timeout']",
    ]
    assert "larger than max_size=2" in info.value.problems[1].problem
    no_secret(info.value)


def test_from_env_reports_every_variable_at_once() -> None:
    environ = {
        "DATABASE_URL": URL,
        "POOLKIT_MIN_SIZE": "abc",
        "POOLKIT_MINSIZE": "3",
        "POOLKIT_TIMEOUT": "-1",
        "POOLKIT_PASSWORD": SECRET,
    }
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_env(environ)
    assert sorted(p.setting for p in info.value.problems) == [
        "POOLKIT_MINSIZE",
        "POOLKIT_MIN_SIZE",
        "POOLKIT_PASSWORD",
        "POOLKIT_TIMEOUT",
    ]
    assert "did you mean 'POOLKIT_MIN_SIZE'?" in str(info.value)
    no_secret(info.value)


def test_replace_and_pool_report_every_problem() -> None:
    cfg = PoolConfig(conninfo=URL)
    makers: list[Callable[[], object]] = [
        lambda: cfg.replace(min_sise=1, timeout=0),
        lambda: config_for_pool("Pool", URL, None, None, None, {"min_sise": 1, "timeout": 0}),
        lambda: Pool(URL, min_sise=1, timeout=0, open=False),
        lambda: Pool(config=cfg, min_sise=1, timeout=0, open=False),
    ]
    for make in makers:
        with pytest.raises(ConfigError) as info:
            make()
        assert len(info.value.problems) == 2
        assert "did you mean 'min_size'?" in str(info.value)
        assert re.search(r"\btimeout=0: must be greater than 0", str(info.value))


def test_many_problems_pickle() -> None:
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_dict({"min_size": -1, "bogus": 1})
    err = info.value
    clone = pickle.loads(pickle.dumps(err))
    assert str(clone) == str(err)
    assert [str(p) for p in clone.problems] == [str(p) for p in err.problems]
    assert clone.setting == err.setting
    single = pickle.loads(pickle.dumps(err.problems[0]))
    assert single.problems == [single] and str(single) == str(err.problems[0])


# -- a message involving a default says so ----------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: PoolConfig(max_size=2),
        lambda: PoolConfig.from_url(URL, max_size=2),
        lambda: PoolConfig.from_dict({"max_size": 2}),
        lambda: PoolConfig.from_env({**ENV, "POOLKIT_MAX_SIZE": "2"}),
        lambda: PoolConfig(conninfo=URL).replace(max_size=2),
        lambda: Pool(URL, max_size=2, open=False),
        lambda: AsyncPool(URL, max_size=2, open=False),
    ],
)
def test_a_default_in_the_message_is_named(make: Callable[[], object]) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    assert str(info.value) == (
        "min_size=4 (the default): larger than max_size=2; raise max_size or lower min_size"
    )
    assert (info.value.setting, info.value.value) == ("min_size", 4)


def test_a_given_value_is_not_called_the_default() -> None:
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_dict({"min_size": 4, "max_size": 2})
    assert str(info.value) == (
        "pool options['min_size']=4: larger than max_size=2; raise max_size or lower min_size"
    )


# -- from_env needs somewhere to connect --------------------------------------------------------


def test_from_env_without_any_target_says_so() -> None:
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_env({"POOLKIT_MIN_SIZE": "2"})
    err = info.value
    assert err.setting == "DATABASE_URL"
    assert err.value is ConfigError.NOT_SET
    text = str(err)
    assert text.startswith("DATABASE_URL is not set: "), text
    assert "POOLKIT_CONNINFO" in text and "PGHOST" in text
    assert "DATABASE_URL=postgresql://" in err.fix


def test_from_env_target_is_reported_after_the_other_problems() -> None:
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_env({"POOLKIT_MAX_SIZE": "ten"})
    assert [p.setting for p in info.value.problems] == ["POOLKIT_MAX_SIZE", "DATABASE_URL"]


@pytest.mark.parametrize(
    ("environ", "setting", "fragment"),
    [
        ({"DATABASE_URL": " \n"}, "DATABASE_URL", "DATABASE_URL='': is empty"),
        ({"POOLKIT_CONNINFO": ""}, "POOLKIT_CONNINFO", "POOLKIT_CONNINFO='': is empty"),
        ({"PGPASSWORD": SECRET}, "DATABASE_URL", "DATABASE_URL is not set"),
    ],
)
def test_from_env_empty_target(environ: dict[str, str], setting: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_env(environ)
    assert info.value.setting == setting
    assert fragment in str(info.value)
    no_secret(info.value)


def test_from_env_without_url_var_names_the_conninfo_variable() -> None:
    with pytest.raises(ConfigError) as info:
        PoolConfig.from_env({}, url_var=None, prefix="APP_")
    assert str(info.value).startswith("APP_CONNINFO is not set: ")


@pytest.mark.parametrize(
    ("environ", "overrides", "conninfo"),
    [
        ({"PGHOST": "db.example"}, {}, ""),
        ({"PGDATABASE": "app"}, {}, ""),
        ({"PGSERVICE": "app"}, {}, ""),
        ({"DATABASE_URL": ""}, {"conninfo": ""}, ""),  # asked for libpq's defaults in code
        ({}, {"conninfo": "host=h"}, "host=h"),
        ({"POOLKIT_CONNINFO": "host=h"}, {}, "host=h"),
        ({"DATABASE_URL": "", "PGHOST": "h"}, {}, ""),
    ],
)
def test_from_env_targets(
    environ: dict[str, str], overrides: dict[str, Any], conninfo: str
) -> None:
    assert PoolConfig.from_env(environ, **overrides).conninfo == conninfo


# -- Pool(config) ---------------------------------------------------------------------------------


def test_config_for_pool_takes_a_poolconfig_first() -> None:
    cfg = PoolConfig(conninfo=URL, min_size=1, name="web")
    assert config_for_pool("Pool", cfg, None, None, None, {}) == cfg
    changed = config_for_pool("Pool", cfg, None, {"connect_timeout": 2}, "none", {"max_size": 3})
    assert (changed.max_size, changed.reset, dict(changed.kwargs)) == (
        3,
        "none",
        {"connect_timeout": 2},
    )
    with pytest.raises(ConfigError) as info:
        config_for_pool("Pool", cfg, cfg, None, None, {})
    assert info.value.setting == "config"
    assert "Pool(config)" in info.value.fix
    with pytest.raises(ConfigError) as info:
        config_for_pool("Pool", 42, None, None, None, {})
    assert info.value.setting == "conninfo"


def test_config_for_pool_merges_kwargs_over_the_config() -> None:
    cfg = PoolConfig(conninfo=URL, kwargs={"connect_timeout": 2, "sslmode": "prefer"})
    merged = config_for_pool("Pool", "", cfg, {"sslmode": "require"}, None, {})
    assert dict(merged.kwargs) == {"connect_timeout": 2, "sslmode": "require"}


@pytest.mark.parametrize("pool_class", [Pool, AsyncPool])
def test_pool_takes_a_poolconfig_first(pool_class: type[Any]) -> None:
    cfg = PoolConfig(conninfo=URL, min_size=1, max_size=2, name="first-arg")
    pool = pool_class(cfg, open=False)
    assert pool.config == cfg
    assert pool_class(cfg, max_size=3, open=False).config.max_size == 3
