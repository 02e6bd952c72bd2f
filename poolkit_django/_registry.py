"""The pools of this process, one per DATABASES alias: built, rebuilt when settings change."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from psycopg.conninfo import make_conninfo

from poolkit import ClusterPool, ConfigError, Pool, PoolConfig
from poolkit._dashboard import CONFIG_FIELDS

from ._options import rename_kwargs_error

if TYPE_CHECKING:
    from .base import DatabaseWrapper

logger = logging.getLogger("poolkit.django")
_leak_logger = logging.getLogger("poolkit.leak")


class Entry:
    """One alias's pool and the connection settings it was built for."""

    __slots__ = (
        "__weakref__", "alias", "auto_reset", "cluster", "extra", "opened", "params", "parkable",
        "pid", "pool",
    )  # fmt: skip

    def __init__(self, alias: str, params: dict[str, Any], extra: tuple[Any, ...], pool: AnyPool):
        self.alias = alias
        self.params = params
        self.extra = extra
        self.pool = pool
        # A multi-host HOST: a write-only ClusterPool that follows the primary.
        self.cluster = isinstance(pool, ClusterPool)
        self.opened = False
        self.pid = os.getpid()
        # Parking skips the reset the pool runs on return: only without one on every return.
        reset = pool.config.resolved_reset
        self.parkable = reset in ("auto", "none")
        self.auto_reset = reset == "auto"

    def __repr__(self) -> str:
        return (
            f"<Entry {self.alias!r} dbname={self.params.get('dbname')!r} pool={self.pool.name!r}>"
        )


# What an alias's pool is: one server, or the primary of several (a multi-host HOST).
AnyPool = Pool[Any] | ClusterPool[Any]
# Connection parameters that name the servers, and libpq's own choice among them: with
# several hosts the ClusterPool routes, one host per pool.
_HOST_KEYS = ("host", "hostaddr", "port")
_LIBPQ_ROUTING = ("target_session_attrs", "load_balance_hosts")

_entries: dict[str, Entry] = {}
_lock = threading.RLock()


def entry_for(wrapper: DatabaseWrapper, conn_params: dict[str, Any], config: PoolConfig) -> Entry:
    """The pool for `wrapper`'s alias, rebuilt if NAME, credentials, OPTIONS or time zone changed.

    Called at every connect: Django's test runner renames the database (create, clone,
    destroy) and override_settings changes the time zone, and a pool must never keep
    lending connections to the database it was built for before that.
    """
    alias = wrapper.alias
    settings_dict = wrapper.settings_dict  # (not `settings`: that is Django's, imported above)
    extra = (
        config,
        wrapper.timezone_name,
        settings_dict["OPTIONS"].get("assume_role"),
        bool(settings_dict.get("CONN_HEALTH_CHECKS")),
    )
    entry = _entries.get(alias)
    if entry is not None and entry.params == conn_params and entry.extra == extra:
        return entry
    with _lock:
        old = _entries.get(alias)
        if old is not None and old.params == conn_params and old.extra == extra:
            return old
        entry = _build(wrapper, conn_params, config, extra)
        _entries[alias] = entry
    if old is not None:
        logger.info(
            "pool %r: connection settings changed (database %r → %r): pool rebuilt",
            old.pool.name,
            old.params.get("dbname"),
            conn_params.get("dbname"),
        )
        retire(old)
    return entry


def current_entry(alias: str) -> Entry | None:
    return _entries.get(alias)


def _build(
    wrapper: DatabaseWrapper, conn_params: dict[str, Any], config: PoolConfig, extra: Any
) -> Entry:
    kwargs = dict(conn_params)
    # Connections start in autocommit; Django sets its own mode after each borrow.
    kwargs["autocommit"] = True
    tz = wrapper.timezone_name
    if tz and not config.pgbouncer:
        # The time zone travels in the startup packet, so the RESET ALL done when a
        # connection comes back keeps it and no SET TIME ZONE is needed after a reset.
        option = "-c TimeZone=" + tz.replace("\\", "\\\\").replace(" ", "\\ ")
        kwargs["options"] = f"{kwargs['options']} {option}" if kwargs.get("options") else option
    try:
        config = config.replace(kwargs=kwargs)
    except ConfigError as exc:
        raise rename_kwargs_error(wrapper.alias, exc) from None
    # Django's own code configures new connections (time zone, role), on a wrapper of its
    # own: binding the caller's would keep that wrapper (and its connection) alive.
    configurer = type(wrapper)(dict(wrapper.settings_dict), wrapper.alias)
    if is_multi_host(conn_params):
        cluster = _build_cluster(wrapper.alias, config, configurer._configure_connection)
        return Entry(wrapper.alias, dict(conn_params), extra, cluster)
    pool: Pool[Any] = Pool(
        config=config,
        open=False,
        configure=configurer._configure_connection,
        check=_health_check(wrapper.settings_dict),
    )
    return Entry(wrapper.alias, dict(conn_params), extra, pool)


def is_multi_host(conn_params: Mapping[str, Any]) -> bool:
    """True when HOST (or PORT) lists several servers, as libpq accepts ("db1,db2")."""
    return any("," in str(conn_params.get(key) or "") for key in _HOST_KEYS)


def _build_cluster(alias: str, config: PoolConfig, configure: Any) -> ClusterPool[Any]:
    """The pool of a multi-host alias: follows the primary as ClusterPool does.

    Only the primary gets a pool (replicas have the monitor's probe connection and
    nothing else): reads through this alias are the primary's too, as with one server;
    replicas are separate aliases behind ReplicaRouter.
    """
    kwargs = dict(config.kwargs)
    hosts = {k: str(kwargs.pop(k)) for k in _HOST_KEYS if kwargs.get(k) not in (None, "")}
    for key in _LIBPQ_ROUTING:
        kwargs.pop(key, None)
    try:
        return ClusterPool(
            make_conninfo("", **hosts),
            config=config.replace(kwargs=kwargs),
            configure=configure,
            replica_pools=False,
            topology_interval=float(getattr(settings, "POOLKIT_TOPOLOGY_INTERVAL", 1.0)),
        )
    except ConfigError as exc:
        raise ImproperlyConfigured(
            f"DATABASES[{alias!r}]['HOST'] / ['PORT']: {exc}; give one PORT for every "
            "host or one per host (HOST='db1,db2', PORT='5432' or '5432,5433')"
        ) from None


def _health_check(settings_dict: Mapping[str, Any]) -> Any:
    """The pool's check= for CONN_HEALTH_CHECKS, as Django's own pool sets it:
    `check_connection` when on (validate=True is forced too, see _options.py), else None."""
    if settings_dict.get("CONN_HEALTH_CHECKS"):
        return Pool.check_connection
    return None


def open_entry(entry: Entry) -> AnyPool:
    if not entry.opened:
        with _lock:
            if not entry.opened:
                entry.pool.open()
                entry.opened = True
    return entry.pool


# -- retiring ------------------------------------------------------------------------

_quiet = threading.local()


class _QuietRetire(logging.Filter):
    """Drops poolkit's "closing with N connection(s) still borrowed" warning while a pool is
    retired because its settings changed: the borrowers are live code (a TestCase
    transaction, the request that changed a setting) and their connections are closed
    when they come back."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_quiet, "on", False)


_leak_logger.addFilter(_QuietRetire())


@contextlib.contextmanager
def _quietly() -> Iterator[None]:
    _quiet.on = True
    try:
        yield
    finally:
        _quiet.on = False


def retire(entry: Entry) -> None:
    """Close a pool that is no longer current: idle connections now, lent ones on return."""
    if entry.pid != os.getpid():
        # Inherited through fork: poolkit detached it, and close() would wait for the
        # parent's borrowers.
        return
    with _quietly():
        entry.pool.close(timeout=0)


def take_entries_for(dbname: str) -> list[Entry]:
    """Take off the books every alias's pool built for `dbname` (the caller retires them)."""
    with _lock:
        taken = [e for e in _entries.values() if e.params.get("dbname") == dbname]
        for entry in taken:
            del _entries[entry.alias]
    return taken


def retire_alias(alias: str) -> None:
    """Django's close_pool(): the next connect builds a new pool."""
    with _lock:
        entry = _entries.pop(alias, None)
    if entry is not None:
        retire(entry)


# -- access --------------------------------------------------------------------------


def pools() -> dict[str, AnyPool]:
    """The pools this process has built so far, by alias (none is created here)."""
    return {alias: e.pool for alias, e in list(_entries.items())}


def get_pool(alias: str = "default") -> AnyPool:
    """The open pool behind ``DATABASES[alias]``, built if needed (health checks, tools)."""
    from django.db import connections

    from .base import DatabaseWrapper

    wrapper = connections[alias]
    if not isinstance(wrapper, DatabaseWrapper):
        raise ImproperlyConfigured(
            f"DATABASES[{alias!r}] does not use a poolkit pool: set its ENGINE to "
            "'poolkit_django' (and leave OPTIONS['pool'] unset, True or a dict)"
        )
    found = wrapper._pk_entry()
    if found is None:
        raise ImproperlyConfigured(
            f"DATABASES[{alias!r}]['OPTIONS']['pool'] is False: pooling is off for this alias"
        )
    return open_entry(found)


def config_mapping(config: PoolConfig) -> Mapping[str, Any]:
    """The settings of a pool as shown by the status command (connection kwargs left out)."""
    return {name: getattr(config, name) for name in CONFIG_FIELDS}
