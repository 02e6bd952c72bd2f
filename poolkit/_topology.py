# WARNING: generated from poolkit/_topology_async.py by scripts/async_to_sync.py: do not edit.
# Edit the async source, then run `python scripts/async_to_sync.py`.
"""ClusterPool's view of the hosts: probe each one's role, start and drain its pool.

Generated from poolkit/_topology_async.py: edit that file, not this one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from time import monotonic
from typing import Any, Generic, TypeVar

import psycopg
from psycopg import Connection

from . import _cluster_compat as compat
from ._cluster_base import ClusterCore, Host, logger
from ._cluster_probe import FAST_PROBE, PROBE_SQL, probe_kwargs
from ._pool import Pool

CT = TypeVar("CT", bound=Connection[Any])


class Topology(ClusterCore, Generic[CT]):
    """One watcher per host: roles learned and re-checked, pools started and drained."""

    _connection_class: type[CT]
    _configure: Callable[[CT], Any] | None
    _changed: compat.Event
    _lock: compat.Lock
    replica_pools: bool

    def _all_probed(self) -> bool:
        return all(h.checked_at is not None or h.error is not None for h in self.hosts)

    def _notify(self) -> None:
        changed, self._changed = self._changed, compat.Event()
        changed.set()

    def _watch(self, host: Host) -> None:
        """Probe one host every topology_interval, sooner on a hint; never die silently."""
        due = 0.0
        while not self._cl_closed:
            try:
                if host.wake or monotonic() >= due or self._probe_readable(host):
                    host.wake = False
                    self._probe(host)
                    fast = self.primary() is None or (not host.healthy and self._cl_waiting_primary)
                    due = monotonic() + (FAST_PROBE if fast else self.topology_interval)
                compat.sleep(FAST_PROBE)
            except Exception as exc:
                # Cancellation is not caught: a task cancelled at loop shutdown must end.
                if self._cl_closed:
                    return
                logger.exception("cluster %r: watcher of %s failed: %r", self.name, host.label, exc)
                compat.sleep(self.topology_interval)

    def _probe_readable(self, host: Host) -> bool:
        probe = host.probe
        if probe is None:
            return False
        try:
            return compat.readable(probe.pgconn.socket)
        except psycopg.Error:
            return True

    def _probe(self, host: Host) -> None:
        row = None
        for attempt in (1, 2):
            try:
                if host.probe is None or host.probe.closed:
                    host.probe = Connection.connect(host.conninfo, **probe_kwargs(host.config))
                cur = host.probe.execute(PROBE_SQL)
                row = cur.fetchone()
                break
            except psycopg.Error as exc:
                # A terminated probe connection is not a dead host: ask again on a new one.
                fresh = host.probe is None
                self._close_probe(host)
                if fresh or attempt == 2:
                    self._host_down(host, exc)
                    return
        retired = None
        with self._lock:
            if self._cl_closed:
                return
            changed = self._cl_apply_probe(host, row)
            if host.pool is not None and host.pool_role != host.role:
                logger.warning(
                    "cluster %r: %s is now a %s: draining its %s connections",
                    self.name, host.label, host.role, host.pool_role,
                )  # fmt: skip
                retired = self._detach(host)
            elif host.pool is not None and host.pool.closed:
                retired = self._detach(host)  # closed under us (a failed wait()): replace it
            if host.pool is None and (self.replica_pools or host.role == "primary"):
                self._start_pool(host)
        if changed:
            self._lost_primary(host)
            self._notify()
        self._drain(host, retired)

    def _host_down(self, host: Host, exc: BaseException) -> None:
        with self._lock:
            was_healthy = host.healthy
            host.healthy = False
            self._cl_record_error(host, exc)
            retired = self._detach(host)
        self._close_probe(host)
        if was_healthy:
            logger.warning("cluster %r: %s is down: %s", self.name, host.label, host.error)
            self._lost_primary(host)
            self._notify()
        self._drain(host, retired)

    def _lost_primary(self, host: Host) -> None:
        """No primary known after `host` changed: probe the others now, not at their next
        interval (each then probes every FAST_PROBE until a primary is seen)."""
        if self.primary() is None:
            for other in self.hosts:
                if other is not host:
                    other.wake = True

    def _start_pool(self, host: Host) -> None:
        role = host.role
        pool: Pool[CT] = Pool(
            config=host.config,
            connection_class=self._connection_class,
            configure=lambda conn: self._configure_conn(host, role, conn),
            open=False,
        )
        pool.open()
        host.pool, host.pool_role = pool, role

    def _configure_conn(self, host: Host, role: str, conn: CT) -> None:
        # The monitor polls; a connection opened between a role change and the next probe
        # must still never be lent as the old role.
        cur = conn.execute(
            "SELECT pg_is_in_recovery() OR current_setting('default_transaction_read_only') = 'on'"
        )
        row = cur.fetchone()
        if not conn.autocommit:
            conn.rollback()
        if bool(row and row[0]) != (role == "replica"):
            host.wake = True
            raise psycopg.OperationalError(
                f"cluster {self.name!r}: {host.label} is no longer a {role}"
            )
        if self._configure is not None:
            self._configure(conn)

    def _detach(self, host: Host) -> Any:
        """Stop lending from a host's pool; `_drain()` closes it outside the lock."""
        pool, host.pool, host.pool_role = host.pool, None, None
        if pool is not None:
            host.retired.append(pool)
        return pool

    def _drain(self, host: Host, pool: Any) -> None:
        """Close a detached pool: idle connections now, lent ones when they come back."""
        if pool is None:
            return
        pool.close(0)
        if not pool.stats()["in_use"]:
            with contextlib.suppress(ValueError):
                host.retired.remove(pool)

    def _close_probe(self, host: Host) -> None:
        probe, host.probe = host.probe, None
        if probe is not None:
            with contextlib.suppress(Exception):
                probe.close()
