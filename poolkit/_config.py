"""PoolConfig: every pool setting, validated once, from keywords, a URL, the environment, a dict."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Self

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from ._errors import ConfigError

__all__ = ["UNSET", "PoolConfig", "ResetCallable", "mask_conninfo"]

ResetCallable = Callable[[Any], object]


class _Unset(enum.Enum):
    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset.UNSET

# libpq keywords whose values are secrets, in conninfo strings and in connect kwargs.
_SECRET_KEYS: Final = frozenset(
    {"password", "sslpassword", "scram_client_key", "scram_server_key", "oauth_client_secret"}
)
_SECRET_WORD: Final = r"(?:ssl)?password|scram_(?:client|server)_key|oauth_client_secret"
_SECRET_PATTERNS: Final = (
    # URL userinfo. libpq ends the password at the first "@", but mask up to the last one so
    # that an unencoded "@" or "/" in a password never leaks (at worst the host is hidden).
    re.compile(r"""[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'"]*:([^\s'"]+)@"""),
    # ... and a password with unencoded spaces, which libpq rejects but a user may well paste.
    re.compile(r"""[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'"]*:([^/@'"\n]+)@"""),
    re.compile(rf"""[?&](?:{_SECRET_WORD})=([^&#\s'"]+)""", re.IGNORECASE),
    # key=value: a quoted value (maybe unterminated) or an unquoted one with backslash escapes.
    re.compile(
        rf"""(?<![\w.?&-])(?:{_SECRET_WORD})\s*=\s*('(?:[^'\\]|\\.)*'?|(?:\\.|[^\s\\])+)""",
        re.IGNORECASE,
    ),
)


def _secret_spans(s: str) -> list[tuple[int, int]]:
    spans = sorted(m.span(1) for rx in _SECRET_PATTERNS for m in rx.finditer(s))
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def mask_conninfo(s: str) -> str:
    """Return `s` with every password in it (URL or key=value form) replaced by ``***``.

    Works on malformed strings and on log text containing a connection string; never raises.
    """
    try:
        text = s if isinstance(s, str) else str(s)
        parts, pos = [], 0
        for start, end in _secret_spans(text):
            parts += [text[pos:start], "***"]
            pos = end
        parts.append(text[pos:])
        return "".join(parts)
    except Exception:
        return "<connection string hidden>"


def _mask_message(message: str, conninfo: str) -> str:
    """Mask a libpq parse error, which quotes fragments of the (secret-bearing) input."""
    spans = _secret_spans(conninfo)

    def hide(m: re.Match[str]) -> str:
        token = m.group(1)
        if (masked := mask_conninfo(token)) != token:
            return f'"{masked}"'
        start = conninfo.find(token)
        while start != -1 and token:
            if any(start < e and s < start + len(token) for s, e in spans):
                return '"***"'
            start = conninfo.find(token, start + 1)
        return f'"{token}"'

    return re.sub(r'"([^"]*)"', hide, mask_conninfo(message.strip()))


def _mask_value(value: object) -> object:
    """`value` as it may appear in an error or repr: passwords replaced by ``***``."""
    if isinstance(value, str | bytes):
        return mask_conninfo(value.decode(errors="replace") if isinstance(value, bytes) else value)
    if isinstance(value, Mapping):
        return {k: "***" if _looks_secret(k) else _mask_value(v) for k, v in value.items()}
    return value


def _did_you_mean(word: object, choices: list[str], prefix: str = "") -> str | None:
    """A "did you mean" hint; `prefix` is shared by all choices, so it is not compared."""
    if not isinstance(word, str):
        return None
    bare = [c.removeprefix(prefix) for c in choices]
    match = difflib.get_close_matches(word.removeprefix(prefix), bare, n=1)
    return f"did you mean {prefix + match[0]!r}?" if match else None


def _looks_secret(key: object) -> bool:
    return isinstance(key, str) and (
        key in _SECRET_KEYS or any(w in key.lower() for w in ("pass", "secret", "token"))
    )


@dataclass(frozen=True, slots=True)
class _Number:
    kind: type[int] | type[float]
    low: float
    above: bool  # the value must be > low (True) or >= low (False)
    optional: bool
    fix: str


_NUMBERS: Final = {
    "prepare_threshold": _Number(
        int, 0, False, True, "use 0 to prepare every query, a count such as 5, or None for never"
    ),
    "min_size": _Number(int, 0, False, False, "use the connections to keep open, e.g. 4"),
    "max_size": _Number(int, 1, False, True, "use 1 or more, or None to match min_size"),
    "max_waiting": _Number(int, 0, False, False, "use 0 for no limit or the most waiters"),
    "num_workers": _Number(int, 1, False, False, "use 1 or more background workers, e.g. 3"),
    "timeout": _Number(float, 0, True, False, "use the seconds a borrower may wait, e.g. 30.0"),
    "max_lifetime": _Number(
        float, 0, True, False, "use the seconds after which a connection is replaced, e.g. 3600.0"
    ),
    "max_idle": _Number(
        float, 0, True, False, "use the seconds an idle connection may stay unused, e.g. 600.0"
    ),
    "reconnect_timeout": _Number(
        float, 0, True, False, "use the seconds to keep retrying a failed connect, e.g. 300.0"
    ),
    "validation_bypass": _Number(
        float, 0, False, False, "use seconds such as 0.5, or 0 to validate every borrow"
    ),
    "leak_threshold": _Number(
        float, 0, False, True, "use the seconds a borrow may last, e.g. 60.0, or None for off"
    ),
    "drain_timeout": _Number(
        float, 0, False, False, "use the seconds close() waits for borrowers, or 0 not to wait"
    ),
    "open_timeout": _Number(
        float, 0, True, True, "use the seconds open(wait=True) may take, or None for no limit"
    ),
    "keepalive_interval": _Number(
        float, 0, True, True, "use the seconds between idle checks, e.g. 60.0, or None for off"
    ),
}
_BOOLS: Final = {
    "autocommit": True,
    "validate": False,
    "leak_capture_stack": False,
    "pgbouncer": False,
}
_NAMES: Final = {
    "application_name": "use a string shown in pg_stat_activity, or None",
    "name": "use a short non-empty label such as 'default' (it appears in logs), or None",
}
_RESETS: Final = ("auto", "reset_all", "discard_all", "none")
# psycopg.connect() arguments that are not libpq keywords.
_CONNECT_ARGS: Final = frozenset(
    {"autocommit", "prepare_threshold", "context", "row_factory", "cursor_factory"}
)
# Settings with both a PoolConfig field and a connect() argument; kwargs may hold one unset here.
_SHARED_WITH_CONNECT: Final = ("autocommit", "application_name", "prepare_threshold")
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
# Variables under the prefix that are not settings (the test suite's database, for instance).
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
# psycopg_pool constructor arguments accepted by from_dict() that have no PoolConfig field.
_POOL_ONLY: Final = {
    "open": "remove it: the integration opens the pool at startup (Django, FastAPI lifespan)",
    "configure": "use 'autocommit', 'application_name' or 'kwargs' (e.g. {'options': '-c x=y'})",
    "connection_class": "remove it: the integration picks the connection class",
    "close_returns": "remove it: poolkit connections always return to the pool on close()",
    "reconnect_failed": "remove it: poolkit logs and retries failed reconnects itself",
}


@functools.cache
def _connect_arguments() -> frozenset[str]:
    libpq = (opt.keyword.decode() for opt in pq.Conninfo.get_defaults())
    return _CONNECT_ARGS.union(libpq)


def _url_scheme(conninfo: str) -> str | None:
    m = re.match(r"\s*([A-Za-z][A-Za-z0-9+.-]*)://", conninfo)
    return m.group(1) if m else None


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class PoolConfig:
    """Every setting of a pool, validated once; immutable (use `replace()` to derive one).

    Build it with keywords, `from_url()`, `from_env()` or `from_dict()`; a bad value raises
    `ConfigError` naming the setting, the value and the fix. Settings are documented in
    the README's settings table.
    """

    conninfo: str = ""
    kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    autocommit: bool | None = None
    application_name: str | None = None
    prepare_threshold: int | _Unset | None = UNSET
    min_size: int = 4
    max_size: int | None = None
    name: str | None = None
    timeout: float = 30.0
    max_waiting: int = 0
    max_lifetime: float = 3600.0
    max_idle: float = 600.0
    reconnect_timeout: float = 300.0
    num_workers: int = 3
    validate: bool = True
    validation_bypass: float = 0.5
    leak_threshold: float | None = None
    leak_capture_stack: bool = False
    reset: str | ResetCallable = "auto"
    drain_timeout: float = 30.0
    open_timeout: float | None = 30.0
    keepalive_interval: float | None = None
    pgbouncer: bool = False

    def __post_init__(self) -> None:
        self._check_conninfo()
        for name, rule in _NUMBERS.items():
            self._check_number(name, rule)
        if self.leak_threshold == 0:
            object.__setattr__(self, "leak_threshold", None)
        for name, optional in _BOOLS.items():
            value = getattr(self, name)
            if not (isinstance(value, bool) or (optional and value is None)):
                fix = (
                    "use True, False or None (psycopg's default)"
                    if optional
                    else "use True or False"
                )
                raise ConfigError(name, value, f"must be a bool, not {type(value).__name__}", fix)
        for name, fix in _NAMES.items():
            value = getattr(self, name)
            if not (value is None or isinstance(value, str)) or (name == "name" and value == ""):
                raise ConfigError(name, value, "must be a non-empty str or None", fix)
        self._check_reset()
        self._check_kwargs()
        if self.max_size is not None and self.max_size < self.min_size:
            raise ConfigError(
                "min_size",
                self.min_size,
                f"larger than max_size={self.max_size}",
                "raise max_size or lower min_size",
            )
        if self.resolved_max_size == 0:
            raise ConfigError(
                "min_size",
                0,
                "with max_size unset (it defaults to min_size) the pool can hold no connection",
                "raise min_size, or set max_size to 1 or more to open connections on demand",
            )

    def _check_conninfo(self) -> None:
        conninfo = self.conninfo
        if not isinstance(conninfo, str):
            raise ConfigError(
                "conninfo",
                _mask_value(conninfo),
                f"must be a str, not {type(conninfo).__name__}",
                "pass a postgresql:// URL or a key=value string",
            )
        problem = None
        try:
            conninfo_to_dict(conninfo)
        except psycopg.Error as exc:
            problem = _mask_message(str(exc), conninfo)
        # Raised outside the except block: the original error (unmasked) must not be chained.
        if problem is None:
            return
        fix = (
            "use a URL such as postgresql://user:password@host:5432/dbname (percent-encode"
            " special characters) or key=value pairs such as 'host=localhost dbname=app'"
        )
        scheme = _url_scheme(conninfo)
        if scheme is not None and scheme not in ("postgresql", "postgres"):
            problem = f"libpq does not understand the URL scheme {scheme!r}"
            fix = "start the URL with postgresql:// (drop driver suffixes such as '+psycopg')"
        raise ConfigError("conninfo", mask_conninfo(conninfo), problem, fix)

    def _check_number(self, name: str, rule: _Number) -> None:
        value = getattr(self, name)
        if (value is None and rule.optional) or (value is UNSET and name == "prepare_threshold"):
            return
        kinds = (int,) if rule.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            expected = "an int" if rule.kind is int else "a number of seconds"
            expected += " or None" if rule.optional else ""
            raise ConfigError(
                name, value, f"must be {expected}, not {type(value).__name__}", rule.fix
            )
        if not (value > rule.low if rule.above else value >= rule.low):  # NaN fails both
            bound = "greater than" if rule.above else "at least"
            raise ConfigError(name, value, f"must be {bound} {rule.low:g}", rule.fix)
        if rule.kind is float:
            object.__setattr__(self, name, float(value))

    def _check_reset(self) -> None:
        reset = self.reset
        if isinstance(reset, str) and reset in _RESETS:
            if self.pgbouncer and reset in ("discard_all", "reset_all"):
                raise ConfigError(
                    "reset",
                    reset,
                    "with pgbouncer=True (transaction pooling) there is no session to reset: the"
                    " command would run on whichever server connection PgBouncer picks and drop"
                    " state, such as prepared statements, that other clients rely on",
                    "use reset='auto' or 'none', or pgbouncer=False for PgBouncer's session mode",
                )
        elif not callable(reset):
            choices = ", ".join(map(repr, _RESETS))
            hint = _did_you_mean(reset, list(_RESETS))
            raise ConfigError(
                "reset",
                reset,
                f"must be one of {choices} or a callable taking the connection",
                hint or "use 'auto' unless you need another policy",
            )

    def _check_kwargs(self) -> None:
        kwargs = self.kwargs
        if not isinstance(kwargs, Mapping):
            raise ConfigError(
                "kwargs",
                _mask_value(kwargs),
                f"must be a mapping of psycopg.connect() arguments, not {type(kwargs).__name__}",
                "pass a dict such as {'connect_timeout': 5}",
            )
        for key, value in kwargs.items():
            setting = f"kwargs[{key!r}]"
            shown = "***" if _looks_secret(key) else _mask_value(value)
            if not isinstance(key, str):
                raise ConfigError(setting, shown, "keys must be str", "use argument names as keys")
            unset = UNSET if key == "prepare_threshold" else None
            if key in _SHARED_WITH_CONNECT and getattr(self, key) is not unset:
                raise ConfigError(
                    setting, shown, f"{key} is also set on PoolConfig", "set it in one place"
                )
            if key in _FIELDS and key not in _SHARED_WITH_CONNECT:
                raise ConfigError(
                    setting,
                    shown,
                    "is a pool setting, not a connection argument",
                    f"pass {key}= to PoolConfig itself",
                )
            if key not in _connect_arguments():
                raise ConfigError(
                    setting,
                    shown,
                    "is neither a libpq connection option nor a psycopg.connect() argument",
                    _did_you_mean(key, sorted(_connect_arguments())) or "check its spelling",
                )
        object.__setattr__(self, "kwargs", MappingProxyType(dict(kwargs)))

    # -- constructors --------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, /, **overrides: Any) -> Self:
        """Settings for the database at `url` (a URL or key=value string), plus `overrides`."""
        return cls(conninfo=url, **overrides)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        prefix: str = "POOLKIT_",
        url_var: str | None = "DATABASE_URL",
        **overrides: Any,
    ) -> Self:
        """Settings from environment variables: `url_var` and ``<prefix><SETTING>``.

        Every setting except `kwargs` can be set (``POOLKIT_MIN_SIZE=8``); ``POOLKIT_CONNINFO``
        wins over `url_var`, and `overrides` win over both. Booleans accept 1/0, true/false,
        yes/no, on/off; optional settings accept ``none`` or an empty value; surrounding
        whitespace is ignored. An unknown
        ``<prefix>*`` variable is an error, so a typo cannot go unnoticed; variables under
        ``<prefix>TEST_`` are left to the test suite.
        """
        if not prefix:
            raise ConfigError(
                "prefix", prefix, "would read every environment variable", "use e.g. 'POOLKIT_'"
            )
        env = os.environ if environ is None else environ
        known = {prefix + name.upper(): name for name in _FIELDS if name != "kwargs"}
        values: dict[str, Any] = {}
        labels: dict[str, str] = {}
        if url_var and url_var in env:
            values["conninfo"], labels["conninfo"] = env[url_var].strip(), url_var
        for var in sorted(env):
            if not var.startswith(prefix) or var == url_var:
                continue
            if var.removeprefix(prefix).startswith(_ENV_NOT_SETTINGS):
                continue
            if (name := known.get(var)) is None:
                raise _unknown_env_var(var, env[var], prefix, url_var, list(known))
            values[name], labels[name] = _parse_env(var, name, env[var]), var
        for name in overrides:
            labels.pop(name, None)
        return cls._build({**values, **overrides}, labels)

    @classmethod
    def from_dict(cls, options: Mapping[str, Any], *, source: str = "pool options") -> Self:
        """Settings from a mapping such as Django's ``OPTIONS["pool"]``.

        Keys are PoolConfig fields or psycopg_pool.ConnectionPool argument names; values must
        already have the right type (no strings for numbers). Errors name the key as
        ``f"{source}[{key!r}]"``, so pass where the mapping came from as `source`.
        """
        if not isinstance(options, Mapping):
            raise ConfigError(
                source,
                _mask_value(options),
                f"must be a mapping of pool settings, not {type(options).__name__}",
                "use a dict such as {'min_size': 2, 'max_size': 10}",
            )
        values: dict[str, Any] = {}
        labels: dict[str, str] = {}
        for key, value in options.items():
            setting = f"{source}[{key!r}]"
            shown = "***" if _looks_secret(key) else _mask_value(value)
            name, value = _from_pool_argument(setting, key, value, shown)
            if name in values:
                raise ConfigError(
                    setting, shown, f"conflicts with {labels[name]}", "keep only one of them"
                )
            values[name], labels[name] = value, setting
        return cls._build(values, labels)

    @classmethod
    def _build(cls, values: dict[str, Any], labels: Mapping[str, str]) -> Self:
        """cls(**values), with errors renamed to what the user wrote (env var, dict key)."""
        try:
            return cls(**values)
        except ConfigError as err:
            field_name, bracket, rest = err.setting.partition("[")
            if field_name not in labels:
                raise
            raise err._renamed(labels[field_name] + bracket + rest) from None

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes` applied and validated again."""
        return dataclasses.replace(self, **changes)

    # -- derived values ------------------------------------------------------------------

    @property
    def resolved_max_size(self) -> int:
        """`max_size`, or `min_size` when it is None (as psycopg_pool does)."""
        return self.min_size if self.max_size is None else self.max_size

    @property
    def resolved_reset(self) -> str | ResetCallable:
        """`reset`, with "auto" turned into "none" behind PgBouncer; "auto" is otherwise
        left for the pool to interpret."""
        return "none" if self.pgbouncer and self.reset == "auto" else self.reset

    @property
    def masked_conninfo(self) -> str:
        """`conninfo` with any password replaced by ``***``, for logs and errors."""
        return mask_conninfo(self.conninfo)

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for psycopg.connect(): `kwargs` plus the connection settings."""
        out: dict[str, Any] = {"prepare_threshold": None} if self.pgbouncer else {}
        out.update(self.kwargs)
        if self.autocommit is not None:
            out["autocommit"] = self.autocommit
        if self.application_name is not None:
            out["application_name"] = self.application_name
        if not isinstance(self.prepare_threshold, _Unset):
            out["prepare_threshold"] = self.prepare_threshold
        return out

    def pool_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for psycopg_pool.ConnectionPool (add `open`, `check`, ...)."""
        return {
            "conninfo": self.conninfo,
            "kwargs": self.connect_kwargs(),
            "min_size": self.min_size,
            "max_size": self.resolved_max_size,
            "name": self.name,
            "timeout": self.timeout,
            "max_waiting": self.max_waiting,
            "max_lifetime": self.max_lifetime,
            "max_idle": self.max_idle,
            "reconnect_timeout": self.reconnect_timeout,
            "num_workers": self.num_workers,
        }

    def __repr__(self) -> str:
        parts = []
        for name in _FIELDS:
            value = getattr(self, name)
            if value == getattr(_DEFAULT, name):
                continue
            shown = _mask_value(dict(value) if name == "kwargs" else value)
            parts.append(f"{name}={shown!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def __reduce__(self) -> tuple[Any, ...]:
        # The read-only kwargs mapping cannot be pickled or deep-copied as is.
        state = {name: getattr(self, name) for name in _FIELDS}
        state["kwargs"] = dict(self.kwargs)
        return (_restore, (type(self), state))


def _restore(cls: type[PoolConfig], state: dict[str, Any]) -> PoolConfig:
    return cls(**state)


def _parse_env(var: str, name: str, raw: str) -> Any:
    text = raw.strip()
    rule = _NUMBERS.get(name)
    optional = _BOOLS.get(name, False) or name in _NAMES or (rule is not None and rule.optional)
    if optional and text.lower() in ("", "none"):
        return None
    if name in _BOOLS:
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


def _unknown_env_var(
    var: str, raw: str, prefix: str, url_var: str | None, known: list[str]
) -> ConfigError:
    shown = "***" if _looks_secret(var) else mask_conninfo(raw)
    if var == f"{prefix}KWARGS":
        where = f"{url_var} as query parameters" if url_var else f"{prefix}CONNINFO"
        fix = f"put them in {where} (e.g. ?connect_timeout=5) or pass kwargs= to from_env()"
        return ConfigError(var, shown, "connect arguments cannot come from the environment", fix)
    fix = _did_you_mean(var, known, prefix) or f"remove it (settings look like {prefix}MIN_SIZE)"
    return ConfigError(var, shown, "is not a poolkit setting", fix)


def _from_pool_argument(setting: str, key: Any, value: Any, shown: object) -> tuple[str, Any]:
    """Map one from_dict() item to a (field, value) pair; psycopg_pool names are translated."""
    if key in _FIELDS:
        return key, value
    if key == "check":
        if value is None:
            return "validate", False
        if value in (ConnectionPool.check_connection, AsyncConnectionPool.check_connection):
            return "validate", True
        raise ConfigError(
            setting,
            shown,
            "custom check callbacks are not supported: poolkit validates connections itself",
            "use 'validate': True (tuned by 'validation_bypass') or False",
        )
    if key in _POOL_ONLY:
        problem = "is a psycopg_pool argument that poolkit sets itself"
        raise ConfigError(setting, shown, problem, _POOL_ONLY[key])
    choices = [*_FIELDS, "check"]
    hint = _did_you_mean(key, choices)
    raise ConfigError(setting, shown, "is not a pool setting", hint or "remove it")


_FIELDS: Final = tuple(f.name for f in dataclasses.fields(PoolConfig))
_DEFAULT: Final = PoolConfig()
