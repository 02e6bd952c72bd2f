"""ReplicaRouter: reads to a healthy, caught-up replica alias; writes, atomic() and migrations
to the primary; every read after a request's first write to the primary too."""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import request_finished, request_started
from django.db import connections
from psycopg.conninfo import make_conninfo

from poolkit import ClusterPool
from poolkit._cluster_hosts import split_hosts

__all__ = ["ReplicaRouter", "topology"]

# Keys of Django's connection parameters that are Python objects, not libpq settings.
_NOT_LIBPQ = frozenset({"cursor_factory", "context", "prepare_threshold", "server_side_binding"})
_state = threading.local()


def _reset(**_: Any) -> None:
    _state.wrote = False


# A request starts clean and ends clean: "read your writes" lasts one request.
request_started.connect(_reset, dispatch_uid="poolkit_django.routers.reset_start")
request_finished.connect(_reset, dispatch_uid="poolkit_django.routers.reset_finish")


def _conninfo(alias: str) -> str:
    params = connections[alias].get_connection_params()
    return make_conninfo(
        "", **{k: v for k, v in params.items() if k not in _NOT_LIBPQ and v not in (None, "")}
    )


class ReplicaRouter:
    """`DATABASE_ROUTERS = ["poolkit_django.routers.ReplicaRouter"]`.

    Replicas are the aliases whose ``TEST["MIRROR"]`` names the primary (Django's own
    convention, which also makes tests see one database), or ``POOLKIT_REPLICAS``. The
    primary is ``POOLKIT_PRIMARY`` (default "default"). A replica is used while it answers
    and its replay lag is at most ``POOLKIT_MAX_REPLICA_LAG`` seconds (default 10), as seen
    by a background probe every ``POOLKIT_TOPOLOGY_INTERVAL`` seconds (default 1).
    """

    def __init__(self) -> None:
        self.primary: str = getattr(settings, "POOLKIT_PRIMARY", "default")
        if self.primary not in settings.DATABASES:
            raise ImproperlyConfigured(
                f"POOLKIT_PRIMARY={self.primary!r} is not in DATABASES: name an alias"
            )
        replicas = getattr(settings, "POOLKIT_REPLICAS", None)
        if replicas is None:
            replicas = [
                alias
                for alias, db in settings.DATABASES.items()
                if alias != self.primary and (db.get("TEST") or {}).get("MIRROR") == self.primary
            ]
        unknown = [a for a in replicas if a not in settings.DATABASES]
        if unknown:
            raise ImproperlyConfigured(
                f"POOLKIT_REPLICAS names {unknown!r}, which are not in DATABASES"
            )
        self.replicas: list[str] = list(replicas)
        self.max_replica_lag = float(getattr(settings, "POOLKIT_MAX_REPLICA_LAG", 10.0))
        self.topology_interval = float(getattr(settings, "POOLKIT_TOPOLOGY_INTERVAL", 1.0))
        self._rr = itertools.count()
        self._monitor: ClusterPool[Any] | None = None
        self._monitor_pid = 0
        self._labels: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        _routers.append(self)

    # -- Django's router interface ------------------------------------------------------

    def db_for_read(self, model: Any, **hints: Any) -> str:
        if not self.replicas or getattr(_state, "wrote", False):
            return self.primary
        if connections[self.primary].in_atomic_block:
            return self.primary  # inside atomic(): read what the transaction wrote
        ready = [alias for alias, host in self.topology().items()
                 if alias in self.replicas and host["ok"]]  # fmt: skip
        if not ready:
            return self.primary
        return ready[next(self._rr) % len(ready)]

    def db_for_write(self, model: Any, **hints: Any) -> str:
        _state.wrote = True
        return self.primary

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool | None:
        aliases = {self.primary, *self.replicas}
        if obj1._state.db in aliases and obj2._state.db in aliases:
            return True
        return None

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool | None:
        if db in self.replicas:
            return False  # replicas get the schema by replication
        return None

    # -- topology -----------------------------------------------------------------------

    def topology(self) -> dict[str, dict[str, Any]]:
        """Each alias's role, health and lag as the probe last saw them (no I/O here)."""
        monitor = self._ensure_monitor()
        out: dict[str, dict[str, Any]] = {}
        hosts = {h["host"]: h for h in monitor.stats()["hosts"]}
        for alias, labels in self._labels.items():
            seen = [hosts[label] for label in labels if label in hosts]
            if not seen:
                continue
            # A multi-host alias (HOST "db1,db2") is where its pool writes: the primary.
            host = next((h for h in seen if h["healthy"] and h["role"] == "primary"), seen[0])
            role, lag, healthy = host["role"], host["lag"], host["healthy"]
            ok = healthy and role == "replica" and lag is not None and lag <= self.max_replica_lag
            out[alias] = {"role": role, "healthy": healthy, "lag": lag, "ok": ok}
        return out

    def _ensure_monitor(self) -> ClusterPool[Any]:
        monitor = self._monitor
        if monitor is not None and self._monitor_pid == os.getpid():
            return monitor
        with self._lock:
            if self._monitor is not None and self._monitor_pid == os.getpid():
                return self._monitor
            # One probe connection per server, no pooled ones: the aliases' own pools lend.
            labels: dict[str, list[str]] = {}
            conninfos: dict[str, str] = {}
            for alias in [self.primary, *self.replicas]:
                hosts = split_hosts(_conninfo(alias))
                labels[alias] = [label for label, _ in hosts]
                for label, ci in hosts:
                    conninfos.setdefault(label, ci)
            monitor = ClusterPool(
                list(conninfos.values()),
                min_size=0,
                max_size=1,
                name="django-replicas",
                topology_interval=self.topology_interval,
                max_replica_lag=self.max_replica_lag,
            )
            monitor.open()
            self._labels = labels
            self._monitor, self._monitor_pid = monitor, os.getpid()
            return monitor

    def close(self) -> None:
        """Stop the probe (tests, or a settings change); the next routing call restarts it."""
        with contextlib.suppress(ValueError):
            _routers.remove(self)
        monitor, self._monitor = self._monitor, None
        if monitor is not None and self._monitor_pid == os.getpid():
            monitor.close(timeout=0)


_routers: list[ReplicaRouter] = []


def topology() -> dict[str, dict[str, Any]]:
    """Role, health and lag of every alias known to the installed ReplicaRouters."""
    out: dict[str, dict[str, Any]] = {}
    for router in _routers:
        out.update(router.topology())
    return out
