"""DATABASES[alias] → PoolConfig: OPTIONS["pool"] validated once, errors as ImproperlyConfigured."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Final

from django.core.exceptions import ImproperlyConfigured

from poolkit import ConfigError, PoolConfig

ENGINE: Final = "poolkit_django"

# Pool settings Django owns: each maps to where the value belongs instead.
_DJANGO_OWNED: Final = {
    "conninfo": "set NAME, USER, PASSWORD, HOST and PORT in DATABASES[{alias!r}]",
    "kwargs": "put connection arguments in DATABASES[{alias!r}]['OPTIONS']",
    "autocommit": "Django manages autocommit: use DATABASES[{alias!r}]['AUTOCOMMIT']",
}

# OPTIONS["pool"]["release"]: when a request gives its connection back (Django-side only).
RELEASES: Final = ("request", "transaction")

_cache: dict[str, tuple[Any, Any, PoolConfig | None]] = {}
_ABSENT: Final = object()  # OPTIONS without "pool": pooling on, with the defaults
_cache_lock = threading.Lock()


def pool_source(alias: str) -> str:
    return f"DATABASES[{alias!r}]['OPTIONS']['pool']"


def pool_config(alias: str, settings_dict: Mapping[str, Any]) -> PoolConfig | None:
    """The pool settings of one DATABASES entry, or None when pooling is off.

    A missing ``OPTIONS["pool"]`` means pooling on with the defaults (the point of the
    engine); ``False`` turns it off and the backend behaves as Django's own.
    """
    options = settings_dict.get("OPTIONS") or {}
    raw = options.get("pool", _ABSENT)
    max_age = settings_dict.get("CONN_MAX_AGE", 0)
    if raw is True and max_age != 0:
        # `"pool": True` is Django's own switch, documented (and tested, by Django's suite)
        # as incompatible with persistent connections: keep that contract for it. Parking
        # (CONN_MAX_AGE under the pool) comes with the engine's own forms.
        raise ImproperlyConfigured(
            "Pooling doesn't support persistent connections. "
            f"DATABASES[{alias!r}]: OPTIONS['pool']=True is Django's native-pool switch, "
            f"which needs CONN_MAX_AGE=0 (it is {max_age!r}). poolkit_django can keep a "
            "pooled connection with its thread between requests: for that, drop "
            "OPTIONS['pool'] or give it as a dict of pool settings (e.g. {'max_size': 10}) "
            "and keep CONN_MAX_AGE; or set CONN_MAX_AGE=0 for a connection per request."
        )
    if raw is _ABSENT:
        raw = True
    health = settings_dict.get("CONN_HEALTH_CHECKS", False)
    cached = _cache.get(alias)
    if cached is not None and cached[0] == raw and cached[1] == health:
        return cached[2]
    config = _build(alias, raw, bool(health))
    with _cache_lock:
        _cache[alias] = (dict(raw) if isinstance(raw, Mapping) else raw, health, config)
    return config


def _build(alias: str, raw: Any, health: bool) -> PoolConfig | None:
    source = pool_source(alias)
    if raw is False or raw is None:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ImproperlyConfigured(
            f"{source}={raw!r}: must be True, False or a dict of pool settings; use e.g."
            " {'min_size': 2, 'max_size': 10} (see poolkit's settings table)"
        )
    release = raw.get("release", "request")
    if release not in RELEASES:
        raise ImproperlyConfigured(
            f"{source}['release']={release!r}: must be 'request' (the default: a request "
            "keeps its connection until it ends) or 'transaction' (given back after each "
            "statement or transaction outside atomic())"
        )
    raw = {k: v for k, v in raw.items() if k != "release"}
    for key, fix in _DJANGO_OWNED.items():
        if key in raw:
            raise ImproperlyConfigured(
                f"{source}[{key!r}]: is not a pool setting under Django; {fix.format(alias=alias)}"
            )
    try:
        config = PoolConfig.from_dict(raw, source=source)
    except ConfigError as exc:
        # Keys given are already named under `source`; a default the checks involve
        # (min_size=4 against a max_size given) is not: with several aliases it would not
        # say which one is wrong.
        def under_source(setting: str) -> str:
            return setting if setting.startswith("DATABASES") else f"{source}[{setting!r}]"

        raise ImproperlyConfigured(str(exc._rename_each(under_source))) from None
    if health:
        explicit = "validate" in raw or "check" in raw
        if explicit and not config.validate:
            raise ImproperlyConfigured(
                f"DATABASES[{alias!r}]['CONN_HEALTH_CHECKS']=True conflicts with "
                f"{source}['validate']=False; keep only one of them"
            )
        config = config.replace(validate=True)
    if config.name is None:
        config = config.replace(name=alias)
    return config


def release_per_transaction(settings_dict: Mapping[str, Any]) -> bool:
    """True when OPTIONS["pool"]["release"] is "transaction" (validated by pool_config())."""
    raw = (settings_dict.get("OPTIONS") or {}).get("pool")
    return isinstance(raw, Mapping) and raw.get("release") == "transaction"


def check_connect_arguments(alias: str, config: PoolConfig, wrapper: Any) -> None:
    """Validate the connection arguments Django will pass (OPTIONS keys included)."""
    try:
        config.replace(kwargs={**wrapper.get_connection_params(), "autocommit": True})
    except ConfigError as exc:
        raise rename_kwargs_error(alias, exc) from None


def rename_kwargs_error(alias: str, exc: ConfigError) -> ImproperlyConfigured:
    """A ConfigError about a connection argument, reported under DATABASES[alias]['OPTIONS']."""
    setting = exc.setting
    if setting.startswith("kwargs["):
        setting = f"DATABASES[{alias!r}]['OPTIONS']" + setting.removeprefix("kwargs")
    elif not setting.startswith("DATABASES"):
        setting = f"{pool_source(alias)}[{setting!r}]"
    return ImproperlyConfigured(str(exc._renamed(setting)))


def is_ours(settings_dict: Mapping[str, Any]) -> bool:
    return settings_dict.get("ENGINE") == ENGINE
