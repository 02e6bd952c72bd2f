"""PoolConfig: every pool setting, validated once, from keywords, a URL, the environment, a dict."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Self

from ._errors import ConfigError
from ._mask import mask_conninfo, mask_value
from ._rules import (
    BOOLS,
    NAMES,
    NUMBERS,
    SHARED_WITH_CONNECT,
    UNSET,
    _Unset,
    check_bool,
    check_conninfo,
    check_kwarg,
    check_lend_order,
    check_name,
    check_number,
    check_reset,
)
from ._sources import Parsed, from_arguments, from_environment, missing_target

# mask_conninfo and UNSET are imported from here by the pools, the CLI, the dashboard, tests.
__all__ = ["UNSET", "PoolConfig", "ResetCallable", "config_for_pool", "mask_conninfo"]

ResetCallable = Callable[[Any], object]


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class PoolConfig:
    """Every setting of a pool, validated once; immutable (use `replace()` to derive one).

    Build it with keywords, `from_url()`, `from_env()` or `from_dict()`; bad values raise
    one `ConfigError` listing every problem, each naming the setting, the value and the fix.
    Settings are documented in the README's settings table.
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
    lend_order: str = "lifo"

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            # In field order, whatever order the checks ran in.
            order = {name: i for i, name in enumerate(_FIELDS)}
            problems.sort(key=lambda p: order.get(p.setting.partition("[")[0], len(order)))
            raise ConfigError._of(problems)

    def _problems(self) -> list[ConfigError]:
        found = [check_conninfo(self.conninfo)]
        for name in NUMBERS:
            problem, value = check_number(name, getattr(self, name))
            found.append(problem)
            if problem is None:
                object.__setattr__(self, name, value)
        if self.leak_threshold == 0:
            object.__setattr__(self, "leak_threshold", None)
        found += [check_bool(name, getattr(self, name)) for name in BOOLS]
        found += [check_name(name, getattr(self, name)) for name in NAMES]
        found += [check_reset(self.reset, self.pgbouncer), *self._check_kwargs()]
        found.append(check_lend_order(self.lend_order))
        problems = [p for p in found if p is not None]
        # Comparing sizes only makes sense once each is valid on its own.
        if not {"min_size", "max_size"} & {p.setting for p in problems}:
            problems += [p for p in (self._check_sizes(),) if p is not None]
        return problems

    def _check_sizes(self) -> ConfigError | None:
        if self.max_size is not None and self.max_size < self.min_size:
            return ConfigError(
                "min_size",
                self.min_size,
                f"larger than max_size={self.max_size}",
                "raise max_size or lower min_size",
                note="the default" if self.min_size == _DEFAULTS["min_size"] else "",
            )
        if self.resolved_max_size == 0:
            return ConfigError(
                "min_size",
                0,
                "with max_size unset (it defaults to min_size) the pool can hold no connection",
                "raise min_size, or set max_size to 1 or more to open connections on demand",
            )
        return None

    def _check_kwargs(self) -> list[ConfigError | None]:
        kwargs = self.kwargs
        if not isinstance(kwargs, Mapping):
            return [
                ConfigError(
                    "kwargs",
                    mask_value(kwargs),
                    "must be a mapping of psycopg.connect() arguments, not "
                    + type(kwargs).__name__,
                    "pass a dict such as {'connect_timeout': 5}",
                )
            ]
        unset = {name: None for name in SHARED_WITH_CONNECT} | {"prepare_threshold": UNSET}
        also_set = [name for name in SHARED_WITH_CONNECT if getattr(self, name) is not unset[name]]
        problems = [check_kwarg(k, v, _FIELDS, also_set) for k, v in kwargs.items()]
        if not any(problems):
            object.__setattr__(self, "kwargs", MappingProxyType(dict(kwargs)))
        return problems

    # -- constructors --------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, /, **overrides: Any) -> Self:
        """Settings for the database at `url` (a URL or key=value string), plus `overrides`.

        `overrides` take the names `from_dict()` takes.
        """
        problems = []
        if "conninfo" in overrides:
            shown = mask_value(overrides.pop("conninfo"))
            problem = "is also given as from_url()'s first argument"
            problems.append(ConfigError("conninfo", shown, problem, "keep only one of them"))
        items = [("conninfo", url, "conninfo"), *((k, v, k) for k, v in overrides.items())]
        return cls._build(from_arguments(items, _FIELDS), late=problems)

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
        whitespace is ignored. An unknown ``<prefix>*`` variable is an error, so a typo
        cannot go unnoticed; variables under ``<prefix>TEST_`` are left to the test suite.
        With neither `url_var` nor ``<prefix>CONNINFO`` set (or both empty), a PG* variable
        that names the server (PGHOST, PGDATABASE, PGSERVICE...) must be set in `environ`,
        or `conninfo` passed: an empty connection string is an error here.
        """
        if not prefix:
            raise ConfigError(
                "prefix", prefix, "would read every environment variable", "use e.g. 'POOLKIT_'"
            )
        env = os.environ if environ is None else environ
        values, labels, problems = from_environment(env, prefix, url_var, _FIELDS)
        late = []
        if "conninfo" not in overrides:
            missing = missing_target(env, prefix, url_var, labels)
            late = [missing] if missing else []
        over_values, over_labels, over_problems = from_arguments(
            ((k, v, k) for k, v in overrides.items()), _FIELDS
        )
        parsed = ({**values, **over_values}, {**labels, **over_labels}, problems + over_problems)
        return cls._build(parsed, late=late)

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
                mask_value(options),
                f"must be a mapping of pool settings, not {type(options).__name__}",
                "use a dict such as {'min_size': 2, 'max_size': 10}",
            )
        items = ((key, value, f"{source}[{key!r}]") for key, value in options.items())
        return cls._build(from_arguments(items, _FIELDS))

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes` applied and validated again (the names `from_dict()` takes)."""
        parsed = from_arguments(((k, v, k) for k, v in changes.items()), _FIELDS)
        return self._build(parsed, base=self)

    @classmethod
    def _build(
        cls, parsed: Parsed, *, base: Self | None = None, late: list[ConfigError] | None = None
    ) -> Self:
        """cls(**values) or base with values; every problem in one ConfigError, each named
        as the user wrote it (env var, dict key), `late` ones last."""
        values, labels, problems = parsed
        try:
            config = cls(**values) if base is None else dataclasses.replace(base, **values)
        except ConfigError as err:
            problems = [*problems, *(_labelled(p, labels) for p in err.problems)]
        else:
            if not problems and not late:
                return config
        raise ConfigError._of([*problems, *(late or ())]) from None

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
            shown = mask_value(dict(value) if name == "kwargs" else value)
            parts.append(f"{name}={shown!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def __reduce__(self) -> tuple[Any, ...]:
        # The read-only kwargs mapping cannot be pickled or deep-copied as is.
        state = {name: getattr(self, name) for name in _FIELDS}
        state["kwargs"] = dict(self.kwargs)
        return (_restore, (type(self), state))


def _restore(cls: type[PoolConfig], state: dict[str, Any]) -> PoolConfig:
    return cls(**state)


def _labelled(problem: ConfigError, labels: Mapping[str, str]) -> ConfigError:
    """`problem` named as the user wrote its setting (an env var, a dict key), if they did."""
    field_name, bracket, rest = problem.setting.partition("[")
    if field_name not in labels:
        return problem
    return problem._as(labels[field_name] + bracket + rest, given=True)


def config_for_pool(
    owner: str,
    conninfo: object,
    config: PoolConfig | None,
    kwargs: object,
    reset: object,
    settings: Mapping[str, Any],
) -> PoolConfig:
    """The PoolConfig of ``owner(conninfo, config=config, kwargs=kwargs, reset=reset,
    **settings)``: a pool constructor's arguments over an optional PoolConfig, which may
    also come first (``Pool(config)``). Errors name the keywords as written; a callable
    `conninfo` is left to the pool."""
    late = []
    if isinstance(conninfo, PoolConfig):
        if config is not None:
            problem = f"a PoolConfig was also given as {owner}()'s first argument"
            fix = f"pass it once: {owner}(config) or {owner}(config=config)"
            late.append(ConfigError("config", config, problem, fix))
        else:
            config = conninfo
        conninfo = ""
    items: list[tuple[str, Any, str]] = [(k, v, k) for k, v in settings.items()]
    if isinstance(conninfo, str):
        if conninfo:
            items.append(("conninfo", conninfo, "conninfo"))
    elif not callable(conninfo):
        late.append(
            ConfigError(
                "conninfo",
                mask_value(conninfo),
                f"must be a str, a callable returning one, or a PoolConfig, not "
                f"{type(conninfo).__name__}",
                "pass a postgresql:// URL or a key=value string",
            )
        )
    if kwargs:
        if config is not None and isinstance(kwargs, Mapping):
            kwargs = {**config.kwargs, **kwargs}
        items.append(("kwargs", kwargs, "kwargs"))
    if reset is not None:
        items.append(("reset", reset, "reset"))
    if config is not None and not items and not late:
        return config
    return PoolConfig._build(from_arguments(items, _FIELDS), base=config, late=late)


_FIELDS: Final = tuple(f.name for f in dataclasses.fields(PoolConfig))
_DEFAULTS: Final = {f.name: f.default for f in dataclasses.fields(PoolConfig)}
_DEFAULT: Final = PoolConfig()
