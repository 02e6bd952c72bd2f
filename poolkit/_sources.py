"""Pool settings from where users write them: keywords, dicts (psycopg_pool names too), env vars."""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Final

from psycopg import pq
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from ._errors import ConfigError
from ._mask import looks_secret, mask_conninfo, mask_value
from ._rules import BOOLS, NAMES, NUMBERS, did_you_mean

__all__ = ["Parsed", "from_arguments", "from_environment", "missing_target"]

# Field values, the name the user gave each (for errors), and problems with the keys.
Parsed = tuple[dict[str, Any], dict[str, str], list[ConfigError]]

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
# POOLKIT_* variables of the test suite, benchmarks and tools: not pool settings.
_ENV_NOT_SETTINGS: Final = (
    "TEST_",
    "PG_BINDIR",
    "BENCH_",
    "UPDATE_",
    "CHAOS_",
    "SOAK_",
    "DASHBOARD",
)
# psycopg_pool constructor arguments accepted as settings that have no PoolConfig field.
_POOL_ONLY: Final = {
    "open": "remove it: the integration opens the pool at startup (Django, FastAPI lifespan)",
    "configure": "use 'autocommit', 'application_name' or 'kwargs' (e.g. {'options': '-c x=y'})",
    "connection_class": "remove it: the integration picks the connection class",
    "close_returns": "remove it: poolkit connections always return to the pool on close()",
    "reconnect_failed": "remove it: poolkit logs and retries failed reconnects itself",
}
# libpq options that say which server, database or role to connect to: with one of their
# PG* variables set, an empty conninfo is a choice, not a forgotten DATABASE_URL.
_TARGET_OPTIONS: Final = ("host", "hostaddr", "port", "dbname", "user", "service")


@functools.cache
def _target_variables() -> tuple[str, ...]:
    by_keyword = {o.keyword.decode(): o.envvar for o in pq.Conninfo.get_defaults()}
    return tuple(v.decode() for k in _TARGET_OPTIONS if (v := by_keyword.get(k)))


def from_arguments(items: Iterable[tuple[Any, Any, str]], fields: Collection[str]) -> Parsed:
    """Settings from (key, value, label) items: keyword arguments or a dict's items.

    Keys are PoolConfig fields or psycopg_pool.ConnectionPool argument names (translated);
    `label` is how an error names the item.
    """
    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    problems: list[ConfigError] = []
    for key, value, label in items:
        shown = "***" if looks_secret(key) else mask_value(value)
        try:
            name, value = _pool_argument(label, key, value, shown, fields)
        except ConfigError as err:
            problems.append(err)
            continue
        if name in values:
            problem = f"conflicts with {labels[name]}"
            problems.append(ConfigError(label, shown, problem, "keep only one of them"))
            continue
        values[name], labels[name] = value, label
    return values, labels, problems


def _pool_argument(
    label: str, key: Any, value: Any, shown: object, fields: Collection[str]
) -> tuple[str, Any]:
    """Map one argument to a (field, value) pair; psycopg_pool names are translated."""
    if key in fields:
        return key, value
    if key == "check":
        if value is None:
            return "validate", False
        if value in (ConnectionPool.check_connection, AsyncConnectionPool.check_connection):
            return "validate", True
        raise ConfigError(
            label,
            shown,
            "custom check callbacks are not supported: poolkit validates connections itself",
            "use 'validate': True (tuned by 'validation_bypass') or False",
        )
    if key in _POOL_ONLY:
        problem = "is a psycopg_pool argument that poolkit sets itself"
        raise ConfigError(label, shown, problem, _POOL_ONLY[key])
    hint = did_you_mean(key, [*fields, "check"])
    raise ConfigError(label, shown, "is not a pool setting", hint or "remove it")


def from_environment(
    env: Mapping[str, str], prefix: str, url_var: str | None, fields: Collection[str]
) -> Parsed:
    """Settings from `url_var` and ``<prefix><SETTING>`` variables (see PoolConfig.from_env)."""
    known = {prefix + name.upper(): name for name in fields if name != "kwargs"}
    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    problems: list[ConfigError] = []
    if url_var and url_var in env:
        values["conninfo"], labels["conninfo"] = env[url_var].strip(), url_var
    for var in sorted(env):
        if not var.startswith(prefix) or var == url_var:
            continue
        if var.removeprefix(prefix).startswith(_ENV_NOT_SETTINGS):
            continue
        if (name := known.get(var)) is None:
            problems.append(_unknown_variable(var, env[var], prefix, url_var, list(known)))
            continue
        try:
            values[name] = _parse(var, name, env[var])
        except ConfigError as err:
            problems.append(err)
            continue
        labels[name] = var
    return values, labels, problems


def _parse(var: str, name: str, raw: str) -> Any:
    text = raw.strip()
    rule = NUMBERS.get(name)
    optional = BOOLS.get(name, False) or name in NAMES or (rule is not None and rule.optional)
    if optional and text.lower() in ("", "none"):
        return None
    if name in BOOLS:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        fix = "use 1/0, true/false, yes/no or on/off" + (", or none" if optional else "")
        raise ConfigError(var, raw, "is not a boolean", fix)
    if rule is not None:
        try:
            return rule.kind(text)
        except ValueError:
            expected = "a whole number" if rule.kind is int else "a number"
            raise ConfigError(var, raw, f"is not {expected}", rule.fix) from None
    return text  # a trailing newline (secret files, heredocs) would end up in dbname


def _unknown_variable(
    var: str, raw: str, prefix: str, url_var: str | None, known: list[str]
) -> ConfigError:
    shown = "***" if looks_secret(var) else mask_conninfo(raw)
    if var == f"{prefix}KWARGS":
        where = f"{url_var} as query parameters" if url_var else f"{prefix}CONNINFO"
        fix = f"put them in {where} (e.g. ?connect_timeout=5) or pass kwargs= to from_env()"
        return ConfigError(var, shown, "connect arguments cannot come from the environment", fix)
    fix = did_you_mean(var, known, prefix) or f"remove it (settings look like {prefix}MIN_SIZE)"
    return ConfigError(var, shown, "is not a pool setting", fix)


def missing_target(
    env: Mapping[str, str], prefix: str, url_var: str | None, labels: Mapping[str, str]
) -> ConfigError | None:
    """The error for an environment that names no database, or None.

    An empty conninfo makes libpq connect to its defaults (the local socket, the OS user's
    database): in a deployment that is a forgotten ``DATABASE_URL``, not a choice, unless a
    PG* variable names the server. Pass ``conninfo=""`` to from_env() to choose it anyway.
    """
    conninfo_label = labels.get("conninfo")
    if conninfo_label is not None and env[conninfo_label].strip():
        return None
    if any(var in env for var in _target_variables()):
        return None
    pg_vars = ", ".join(_target_variables())
    conninfo_var = f"{prefix}CONNINFO"
    fix = (
        f"set {url_var or conninfo_var}=postgresql://user:password@host:5432/dbname, or"
        " PGHOST and PGDATABASE; to use libpq's defaults, pass conninfo='' to from_env()"
    )
    if conninfo_label is not None:
        problem = f"is empty, and no libpq variable naming the server ({pg_vars}) is set"
        return ConfigError(conninfo_label, "", problem, fix)
    others = f"{conninfo_var} or " if url_var else ""
    problem = (
        f"nor is {others}any libpq variable naming the server ({pg_vars}), so there is"
        " no database to connect to"
    )
    return ConfigError(url_var or conninfo_var, ConfigError.NOT_SET, problem, fix)
