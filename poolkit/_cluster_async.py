"""AsyncClusterPool: one AsyncPool per host of a primary/replica set, routed by role and lag."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from sys import _getframe
from time import monotonic
from types import TracebackType
from typing import Any, Generic, TypeVar, cast
from weakref import WeakKeyDictionary

import psycopg
from psycopg import AsyncConnection
from psycopg.errors import InFailedSqlTransaction
from psycopg.pq import TransactionStatus

from . import _cluster_acompat as compat
from . import _psycopg
from ._cluster_base import FAILED_TX, Host, Lent, logger
from ._cluster_probe import FAST_PROBE, reports_read_only, reveals_change
from ._config import PoolConfig
from ._conn import check_callbacks
from ._errors import PoolClosed
from ._leaks import Site
from ._topology_async import AsyncTopology

__all__ = ["AsyncClusterPool"]

ACT = TypeVar("ACT", bound=AsyncConnection[Any])

_IDLE = TransactionStatus.IDLE
_UNKNOWN = TransactionStatus.UNKNOWN
_INERROR = TransactionStatus.INERROR
# How long a borrower waiting for a primary sleeps before it routes again on its own.
_REROUTE = 0.5


class _Lease(Generic[ACT]):
    """`async with cluster.connection() as conn`: commit on success, rollback on error."""

    __slots__ = ("_cluster", "_conn", "_primary", "_read_only", "_tag", "_timeout")

    def __init__(
        self,
        cluster: AsyncClusterPool[ACT],
        timeout: float | None,
        read_only: bool,
        primary: bool,
        tag: str | None,
    ) -> None:
        self._cluster = cluster
        self._timeout = timeout
        self._read_only = read_only
        self._primary = primary
        self._tag = tag

    async def __aenter__(self) -> ACT:
        self._conn = await self._cluster.getconn(
            self._timeout, read_only=self._read_only, primary=self._primary, tag=self._tag
        )
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        try:
            status = conn.pgconn.transaction_status
            if status != _IDLE and status != _UNKNOWN:
                if exc_type is None and status == _INERROR:
                    await conn.rollback()
                    raise InFailedSqlTransaction(FAILED_TX)
                if exc_type is None:
                    await conn.commit()
                else:
                    try:
                        await conn.rollback()
                    except Exception as ex:
                        logger.warning("cluster %r: rollback failed: %s", self._cluster.name, ex)
        except BaseException as ex:
            self._cluster._suspect(conn, ex)
            raise
        finally:
            self._cluster._suspect(conn, exc)
            await self._cluster.putconn(conn)


class AsyncClusterPool(AsyncTopology[ACT], Generic[ACT]):
    """An asyncio pool over a primary and its replicas: one AsyncPool per host.

    Writes go to the current primary, reads (`read_only=True`) to a replica within
    `max_replica_lag` seconds, chosen by `read_policy`; roles are polled every
    `topology_interval` and at once after an error that hints at a change. With
    `replica_pools=False` replicas get no pool (only the monitor's probe): a write-only
    cluster, whose reads go to the primary. Every other keyword is a PoolConfig setting
    applied to each host's pool. Use it with `async with AsyncClusterPool(...) as
    cluster` or `await cluster.open()`.
    """

    def __init__(
        self,
        conninfo: str | Sequence[str] = "",
        *,
        config: PoolConfig | None = None,
        connection_class: type[ACT] = cast(type[ACT], AsyncConnection),  # noqa: B008
        configure: Callable[[ACT], Any] | None = None,
        topology_interval: float = 1.0,
        max_replica_lag: float = 10.0,
        read_policy: str = "least_busy",
        fallback: str = "primary",
        replica_pools: bool = True,
        **settings: Any,
    ) -> None:
        _psycopg.check_connection_class(connection_class, AsyncConnection)
        check_callbacks(configure=configure)
        self._cl_init(
            conninfo, config, settings, topology_interval, max_replica_lag, read_policy, fallback
        )
        self.replica_pools = bool(replica_pools)
        self._connection_class = connection_class
        self._configure = configure
        # Weak: a handle dropped unreturned must be collected, so that its host pool
        # reclaims the connection (as a single pool does); the books lose it with it.
        self._lent: WeakKeyDictionary[ACT, Lent] = WeakKeyDictionary()
        # Connections parked in their host's pool (weak for the same reason).
        self._parked: WeakKeyDictionary[ACT, Lent] = WeakKeyDictionary()
        self._changed = compat.Event()
        self._lock = compat.Lock()

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        """Start watching every host; pools open as their roles become known."""
        if self._cl_closed:
            raise PoolClosed(f"the cluster {self.name!r} is closed")
        if self._cl_opened:
            return
        self._cl_opened = True
        for host in self.hosts:
            host.worker = compat.spawn(self._watch, host, name=f"{self.name}[{host.label}] watch")

    async def wait(self, timeout: float = 30.0) -> None:
        """Wait until every host was reached once, a primary is known and the pool of every
        healthy host is full."""
        deadline = monotonic() + timeout
        # A host is marked reached when its probe answers, just before its pool is started:
        # wait for that pool too, or the first read-only borrow could go to the primary.
        while monotonic() < deadline and (
            self.primary() is None
            or any((h.checked_at is None and h.error is None) or (h.healthy and h.pool is None)
                   for h in self.hosts)
        ):  # fmt: skip
            failed = self._cl_connect_failed()
            if failed is not None:
                raise failed
            await self._changed.wait(min(FAST_PROBE, max(deadline - monotonic(), 0.0)))
        if self.primary() is None:
            raise self._cl_no_host(False, timeout)
        for host in self.hosts:
            if host.pool is not None and host.healthy:
                await host.pool.wait(max(deadline - monotonic(), 0.001))

    async def close(self, timeout: float | None = None) -> None:
        """Stop watching, then close every host's pool (each drains as Pool.close does)."""
        if self._cl_closed:
            return
        self._cl_closed = True
        self._notify()
        for host in self.hosts:
            if host.worker is not None:
                await host.worker.join(5.0)
        deadline = monotonic() + (self.config.drain_timeout if timeout is None else timeout)
        for host in self.hosts:
            pools = [p for p in (host.pool, *host.retired) if p is not None]
            host.pool = None
            host.retired = []
            for pool in pools:
                await pool.close(max(deadline - monotonic(), 0.0))
            await self._close_probe(host)

    @property
    def closed(self) -> bool:
        return self._cl_closed

    async def __aenter__(self) -> AsyncClusterPool[ACT]:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- borrow -------------------------------------------------------------------------

    def connection(
        self,
        timeout: float | None = None,
        *,
        read_only: bool = False,
        primary: bool = False,
        tag: str | None = None,
    ) -> _Lease[ACT]:
        """Borrow for an `async with` block: from the primary, or a replica if `read_only`."""
        return _Lease(self, timeout, read_only, primary, tag)

    async def getconn(
        self,
        timeout: float | None = None,
        *,
        read_only: bool = False,
        primary: bool = False,
        tag: str | None = None,
    ) -> ACT:
        """Borrow a connection; pair every call with `putconn()` (prefer `connection()`).

        Writes wait (within `timeout`) while no primary is known, as during a failover,
        and get the new one as soon as the monitor sees it. Reads get a READ ONLY
        transaction on a replica within `max_replica_lag`, else `fallback` decides;
        `read_only=True, primary=True` is a read-only transaction on the primary (to read
        one's own writes).
        """
        return await self._borrow(timeout, read_only, primary, tag, _getframe(1))

    async def _borrow(
        self, timeout: float | None, read_only: bool, primary: bool, tag: str | None, site: Site
    ) -> ACT:
        """Borrow, attributing the borrow to `site` for the host pool's leak tracking."""
        if not self._cl_opened or self._cl_closed:
            state = "closed" if self._cl_closed else "not open: call open() first"
            raise PoolClosed(f"the cluster {self.name!r} is {state}")
        if self._cl_pid != os.getpid():
            self._after_fork()
        start = monotonic()
        deadline = start + (self.timeout if timeout is None else timeout)
        while True:
            changed = self._changed
            host = self._cl_route(read_only and not primary)
            pool = host.pool if host is not None else None
            left = deadline - monotonic()
            if host is not None and pool is not None:
                try:
                    conn = await pool._borrow(max(left, 0.0), tag, site)
                except PoolClosed:
                    # The host changed role or went down while we waited: route again.
                    if self._cl_closed:
                        raise
                    if host.pool is pool:  # not replaced yet: let the watcher do it
                        host.wake = True
                        await changed.wait(min(max(deadline - monotonic(), 0.0), FAST_PROBE))
                    continue
                if host.pool is not pool:
                    await pool.putconn(conn)
                    continue
                return await self._lend(host, pool, conn, read_only)
            failed = self._cl_connect_failed()
            if failed is not None:
                raise failed
            if read_only and self.fallback == "error" and self._all_probed():
                raise self._cl_no_host(True, monotonic() - start)
            if left <= 0:
                raise self._cl_no_host(read_only, monotonic() - start)
            self._cl_waiting_primary += 1
            try:
                await changed.wait(min(left, _REROUTE))
            finally:
                self._cl_waiting_primary -= 1

    async def _lend(self, host: Host, pool: Any, conn: ACT, read_only: bool) -> ACT:
        session_ro = False
        if read_only:
            try:
                if not conn.autocommit:
                    await conn.set_read_only(True)
                elif host.role == "primary":
                    # Autocommit statements run outside any BEGIN READ ONLY.
                    await conn.execute("SET default_transaction_read_only = on")
                    session_ro = True
            except BaseException:
                await pool.putconn(conn)
                raise
        self._lent[conn] = Lent(host, pool, session_ro)
        return conn

    async def putconn(self, conn: ACT) -> None:
        """Give back a connection from `getconn()`; one lent before a role change is closed."""
        try:
            lent = self._lent.pop(conn, None)
        except TypeError:  # not weak-referenceable: no connection at all
            lent = None
        if lent is None:
            raise psycopg.ProgrammingError(
                f"can't return connection to cluster {self.name!r}: it was not lent by it"
            )
        host = lent.host
        if reveals_change(None, conn):
            host.wake = True
        elif lent.session_ro and conn.pgconn.transaction_status == _IDLE:
            try:
                await conn.execute("RESET default_transaction_read_only")
            except psycopg.Error:
                host.wake = True
        elif host.role == "primary" and reports_read_only(conn):
            host.wake = True  # the session saw the server turn read-only (a writer flip)
        await lent.pool.putconn(conn)
        if lent.pool is not host.pool and not lent.pool.stats()["in_use"]:
            with contextlib.suppress(ValueError):  # another thread removed it first
                host.retired.remove(lent.pool)

    def _suspect(self, conn: ACT, exc: BaseException | None) -> None:
        """An error in a borrow may reveal a failover: have that host probed now."""
        lent = self._lent.get(conn)
        if lent is not None and reveals_change(exc, conn):
            lent.host.wake = True

    # -- parking (Django's CONN_MAX_AGE) -------------------------------------------------

    def _park(self, conn: ACT) -> bool:
        """Keep `conn` reserved for its borrower in its host's pool (see Pool._park).

        False, and nothing done, when it must go back through putconn() instead: the
        host changed role since the borrow, or the borrow changed the session.
        """
        lent = self._lent.get(conn)
        if lent is None:
            raise psycopg.ProgrammingError(
                f"can't park connection in cluster {self.name!r}: it was not lent by it"
            )
        if lent.session_ro or lent.pool is not lent.host.pool:
            return False
        if not lent.pool._park(conn):
            return False
        # A borrower that takes it over from the pool meanwhile gets a handle of its own
        # (booked by _lend): this one stays the parker's, and _unpark() then says False.
        del self._lent[conn]
        self._parked[conn] = lent
        return True

    def _unpark(self, conn: ACT, tag: str | None = None, site: Site = None) -> bool:
        """Take back a parked connection: False if its pool gave it to someone else, or
        if its host changed role meanwhile (its retired pool closes it: never lent as the
        old role)."""
        lent = self._parked.pop(conn, None)
        if lent is None or lent.pool is not lent.host.pool:
            return False
        if not lent.pool._unpark(conn, tag, site):
            return False
        self._lent[conn] = lent
        return True

    async def check(self) -> None:
        """Validate every idle connection of every host now (Pool.check on each)."""
        for host in self.hosts:
            if host.pool is not None:
                await host.pool.check()

    # -- topology -----------------------------------------------------------------------

    def _after_fork(self) -> None:
        """In a forked child: the watchers stayed in the parent; start this process's own.

        The probe connections are the parent's sockets: kept referenced and never used or
        closed here (closing would end the parent's session). Each host pool handles the
        fork of its own connections.
        """
        self._cl_pid = os.getpid()
        self._parked.clear()  # the parent's: each host pool rebuilds its connections
        self._changed = compat.Event()
        self._lock = compat.Lock()
        for host in self.hosts:
            if host.probe is not None:
                self._cl_orphans.append(host.probe)
                host.probe = None
            host.worker = compat.spawn(self._watch, host, name=f"{self.name}[{host.label}] watch")
