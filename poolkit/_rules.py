"""What each PoolConfig setting accepts: one check per setting, each problem with its fix."""

from __future__ import annotations

import difflib
import enum
import functools
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict

from ._errors import ConfigError
from ._mask import looks_secret, mask_conninfo, mask_message, mask_value

__all__ = [
    "BOOLS",
    "NAMES",
    "NUMBERS",
    "SHARED_WITH_CONNECT",
    "UNSET",
    "Number",
    "check_bool",
    "check_conninfo",
    "check_kwarg",
    "check_name",
    "check_number",
    "check_reset",
    "did_you_mean",
]


class _Unset(enum.Enum):
    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


# prepare_threshold's default: None means "never prepare", so "not set" needs its own value.
UNSET: Final = _Unset.UNSET


@dataclass(frozen=True, slots=True)
class Number:
    kind: type[int] | type[float]
    low: float
    above: bool  # the value must be > low (True) or >= low (False)
    optional: bool
    fix: str


NUMBERS: Final = {
    "prepare_threshold": Number(
        int, 0, False, True, "use 0 to prepare every query, a count such as 5, or None for never"
    ),
    "min_size": Number(int, 0, False, False, "use the connections to keep open, e.g. 4"),
    "max_size": Number(int, 1, False, True, "use 1 or more, or None to match min_size"),
    "max_waiting": Number(int, 0, False, False, "use 0 for no limit or the most waiters"),
    "num_workers": Number(int, 1, False, False, "use 1 or more background workers, e.g. 3"),
    "timeout": Number(float, 0, True, False, "use the seconds a borrower may wait, e.g. 30.0"),
    "max_lifetime": Number(
        float, 0, True, False, "use the seconds after which a connection is replaced, e.g. 3600.0"
    ),
    "max_idle": Number(
        float, 0, True, False, "use the seconds an idle connection may stay unused, e.g. 600.0"
    ),
    "reconnect_timeout": Number(
        float, 0, True, False, "use the seconds to keep retrying a failed connect, e.g. 300.0"
    ),
    "validation_bypass": Number(
        float, 0, False, False, "use seconds such as 0.5, or 0 to validate every borrow"
    ),
    "leak_threshold": Number(
        float, 0, False, True, "use the seconds a borrow may last, e.g. 60.0, or None for off"
    ),
    "drain_timeout": Number(
        float, 0, False, False, "use the seconds close() waits for borrowers, or 0 not to wait"
    ),
    "open_timeout": Number(
        float, 0, True, True, "use the seconds open(wait=True) may take, or None for no limit"
    ),
    "keepalive_interval": Number(
        float, 0, True, True, "use the seconds between idle checks, e.g. 60.0, or None for off"
    ),
}
# Boolean settings: whether None is accepted too.
BOOLS: Final = {
    "autocommit": True,
    "validate": False,
    "leak_capture_stack": False,
    "pgbouncer": False,
}
# Optional str settings and their fix.
NAMES: Final = {
    "application_name": "use a string shown in pg_stat_activity, or None",
    "name": "use a short non-empty label such as 'default' (it appears in logs), or None",
}
RESETS: Final = ("auto", "reset_all", "discard_all", "none")
LEND_ORDERS: Final = ("lifo", "fifo")
# psycopg.connect() arguments that are not libpq keywords.
CONNECT_ARGS: Final = frozenset(
    {"autocommit", "prepare_threshold", "context", "row_factory", "cursor_factory"}
)
# Settings with both a PoolConfig field and a connect() argument; kwargs may hold one unset here.
SHARED_WITH_CONNECT: Final = ("autocommit", "application_name", "prepare_threshold")


@functools.cache
def connect_arguments() -> frozenset[str]:
    """Every keyword psycopg.connect() accepts: libpq's options plus psycopg's own."""
    libpq = (opt.keyword.decode() for opt in pq.Conninfo.get_defaults())
    return CONNECT_ARGS.union(libpq)


def did_you_mean(word: object, choices: list[str], prefix: str = "") -> str | None:
    """A "did you mean" hint; `prefix` is shared by all choices, so it is not compared."""
    if not isinstance(word, str):
        return None
    bare = [c.removeprefix(prefix) for c in choices]
    match = difflib.get_close_matches(word.removeprefix(prefix), bare, n=1)
    return f"did you mean {prefix + match[0]!r}?" if match else None


def check_conninfo(conninfo: object) -> ConfigError | None:
    if not isinstance(conninfo, str):
        return ConfigError(
            "conninfo",
            mask_value(conninfo),
            f"must be a str, not {type(conninfo).__name__}",
            "pass a postgresql:// URL or a key=value string",
        )
    problem = None
    try:
        conninfo_to_dict(conninfo)
    except psycopg.Error as exc:
        problem = mask_message(str(exc), conninfo)
    # Built outside the except block: the original error (unmasked) must not be chained.
    if problem is None:
        return None
    fix = (
        "use a URL such as postgresql://user:password@host:5432/dbname (percent-encode"
        " special characters) or key=value pairs such as 'host=localhost dbname=app'"
    )
    scheme = re.match(r"\s*([A-Za-z][A-Za-z0-9+.-]*)://", conninfo)
    if scheme and scheme.group(1) not in ("postgresql", "postgres"):
        problem = f"libpq does not understand the URL scheme {scheme.group(1)!r}"
        fix = "start the URL with postgresql:// (drop driver suffixes such as '+psycopg')"
    return ConfigError("conninfo", mask_conninfo(conninfo), problem, fix)


def check_number(name: str, value: Any) -> tuple[ConfigError | None, Any]:
    """The problem with numeric setting `name`, or None and the value to keep (floats as float)."""
    rule = NUMBERS[name]
    if (value is None and rule.optional) or (value is UNSET and name == "prepare_threshold"):
        return None, value
    kinds = (int,) if rule.kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        expected = "an int" if rule.kind is int else "a number of seconds"
        expected += " or None" if rule.optional else ""
        problem = f"must be {expected}, not {type(value).__name__}"
        return ConfigError(name, value, problem, rule.fix), value
    if not (value > rule.low if rule.above else value >= rule.low):  # NaN fails both
        bound = "greater than" if rule.above else "at least"
        return ConfigError(name, value, f"must be {bound} {rule.low:g}", rule.fix), value
    return None, float(value) if rule.kind is float else value


def check_bool(name: str, value: object) -> ConfigError | None:
    optional = BOOLS[name]
    if isinstance(value, bool) or (optional and value is None):
        return None
    fix = "use True, False or None (psycopg's default)" if optional else "use True or False"
    return ConfigError(name, value, f"must be a bool, not {type(value).__name__}", fix)


def check_name(name: str, value: object) -> ConfigError | None:
    if (value is None or isinstance(value, str)) and not (name == "name" and value == ""):
        return None
    return ConfigError(name, value, "must be a non-empty str or None", NAMES[name])


def check_reset(reset: object, pgbouncer: object) -> ConfigError | None:
    if isinstance(reset, str) and reset in RESETS:
        if pgbouncer is True and reset in ("discard_all", "reset_all"):
            return ConfigError(
                "reset",
                reset,
                "with pgbouncer=True (transaction pooling) there is no session to reset: the"
                " command would run on whichever server connection PgBouncer picks and drop"
                " state, such as prepared statements, that other clients rely on",
                "use reset='auto' or 'none', or pgbouncer=False for PgBouncer's session mode",
            )
        return None
    if callable(reset):
        return None
    return ConfigError(
        "reset",
        reset,
        f"must be one of {', '.join(map(repr, RESETS))} or a callable taking the connection",
        did_you_mean(reset, list(RESETS)) or "use 'auto' unless you need another policy",
    )


def check_kwarg(
    key: object, value: object, fields: Collection[str], also_set: Collection[str]
) -> ConfigError | None:
    """The problem with connect argument `key`; `also_set`: PoolConfig fields that are set
    and that psycopg.connect() takes too."""
    setting = f"kwargs[{key!r}]"
    shown = "***" if looks_secret(key) else mask_value(value)
    if not isinstance(key, str):
        return ConfigError(setting, shown, "keys must be str", "use argument names as keys")
    if key in also_set:
        return ConfigError(
            setting, shown, f"{key} is also set on PoolConfig", "set it in one place"
        )
    if key in fields and key not in SHARED_WITH_CONNECT:
        return ConfigError(
            setting,
            shown,
            "is a pool setting, not a connection argument",
            f"pass {key}= to PoolConfig itself",
        )
    if key not in connect_arguments():
        return ConfigError(
            setting,
            shown,
            "is neither a libpq connection option nor a psycopg.connect() argument",
            did_you_mean(key, sorted(connect_arguments())) or "check its spelling",
        )
    return None


def check_lend_order(value: object) -> ConfigError | None:
    if value in LEND_ORDERS:
        return None
    return ConfigError(
        "lend_order",
        value,
        "must be 'lifo' or 'fifo'",
        "use 'lifo' (the default: the most recently returned connection first, so a surplus "
        "idles out after max_idle) or 'fifo' (psycopg_pool's order: every connection in turn)",
    )
