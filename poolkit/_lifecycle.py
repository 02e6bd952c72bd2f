# WARNING: generated from poolkit/_lifecycle_async.py by scripts/async_to_sync.py: do not edit.
# Edit the async source, then run `python scripts/async_to_sync.py`.
"""Pool's lifecycle: connecting, filling, growing, shrinking, reconnecting, maintenance.

Generated from poolkit/_lifecycle_async.py: edit that file, not this one.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from time import monotonic
from typing import Any, Generic, TypeVar, cast
from weakref import ref

from psycopg import Connection, ProgrammingError
from psycopg.pq import TransactionStatus

from . import _psycopg
from ._compat import Event, Worker, current_owner, ensure, sleep, spawn
from ._errors import ConnectFailed, PoolClosed, PoolTimeout
from ._leaks import leak_logger, logger
from ._messages import describe_error, permanent_fix
from ._peek import cut
from ._slot import Slot
from ._upkeep import Upkeep

CT = TypeVar("CT", bound=Connection[Any])

_IDLE = TransactionStatus.IDLE
# While borrowers wait and nothing can be lent, connection attempts follow each other at
# this interval: a server coming back is used within it (no exponential backoff lag).
RETRY_WHILE_WAITING = 0.25
# With nobody waiting, attempts back off exponentially from FIRST_BACKOFF to MAX_BACKOFF.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 10.0


class Lifecycle(Upkeep[CT], Generic[CT]):
    """The pool's own background worker and the connections' life from connect to close."""

    conninfo: str | Callable[..., Any]
    kwargs: dict[str, Any] | Callable[..., Any]
    connection_class: type[CT]
    _check: Callable[[CT], Any] | None
    _reconnect_failed: Callable[..., Any] | None
    _auto: bool
    _connect_timeout: float | None
    _open_implicit: bool

    def _init_lifecycle(self) -> None:
        self._wakeup = Event()
        self._filled = Event()
        self._worker = None
        self._forked = False
        self._connectors: set[Worker] = set()  # connection attempts in flight
        # Return-path I/O (commit, rollback, reset) in flight: key -> (deadline, conn).
        # The worker cuts the socket of any that overruns (a black-holed network).
        self._deadlines: dict[int, tuple[float, Any]] = {}
        self._failures = 0
        self._retries = 0
        self._outage = False  # from a lost connection or a failed connect to the next success
        self._last_attempt = 0.0
        self._last_housekeeping = 0.0

    # -- open / wait / close -----------------------------------------------------------

    def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        """Start connecting (min_size connections); with `wait`, until they are open."""
        self._open()
        if wait:
            self.wait(timeout)

    def _open(self) -> None:
        if not self._closed:
            return
        if self._opened:
            raise PoolClosed(f"the pool {self.name!r} was closed and cannot be reopened")
        self._closed = False
        self._opened = True
        self._start_worker()

    def _start_worker(self) -> None:
        self._worker = spawn(_maintain, ref(self), name=f"{self.name}-worker")

    def wait(self, timeout: float = 30.0) -> None:
        """Wait until min_size connections are open; fail at once if connecting cannot work.

        A permanent connect error (wrong password, unknown database...) raises
        ConnectFailed after the first attempt; the pool keeps retrying in the background.
        On timeout the pool is closed and PoolTimeout says why.
        """
        deadline = monotonic() + timeout
        while True:
            self._filled.clear()
            with self._lock:
                if self._closed:
                    raise self._closed_error()
                if self._nconns >= self._min_size:
                    return
                failed = self._permanent_fix is not None
            if failed:
                raise ConnectFailed(self._connect_failed_message())
            left = deadline - monotonic()
            if left <= 0:
                break
            self._filled.wait(min(left, 0.1))
        why = f": {self._last_error}" if self._last_error else ""
        self.close(timeout=0)
        raise PoolTimeout(
            f"pool {self.name!r} could not open {self._min_size} connection(s) to "
            f"{self._dsn()} within {timeout} s{why}"
        )

    def close(self, timeout: float | None = None) -> None:
        """Stop lending, wait up to `timeout` (default: drain_timeout) for borrowers, close."""
        if self._closed:
            return
        if timeout is None:
            timeout = self.config.drain_timeout
        with self._lock:
            self._draining = True
            waiting = list(self._waiting)
            self._waiting.clear()
            for w in waiting:
                w.fail(PoolClosed(f"the pool {self.name!r} is closing"))
        # The caller's own borrows cannot come back while it waits here: wait for others'.
        me = current_owner()
        ident = _ident()
        deadline = monotonic() + timeout
        while monotonic() < deadline and any(
            (s.task is not me) if me is not None else (s.owner != ident) for s in self._in_use()
        ):
            sleep(0.01)
        in_use = self._in_use()
        if in_use:
            # close(timeout=0) means "now": worth a note, not a warning.
            (leak_logger.warning if timeout > 0 else leak_logger.info)(
                "pool %r: closing with %d connection(s) still borrowed after a %.1f s drain: %s",
                self.name,
                len(in_use),
                timeout,
                "; ".join(f"{b.site} ({b.held_for:.1f} s)" for b in self.borrowed()),
            )
        with self._lock:
            self._closed = True
            idle = [*self._idle]
            self._idle.clear()
            while self._parked:
                try:
                    key, slot = self._parked.popitem()
                except KeyError:  # unparked meanwhile (no lock there)
                    break
                self._unbook_parked(key, slot)
                idle.append(slot)
        for slot in idle:
            self._retire(slot)
        self._wakeup.set()
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.join(5.0)
        # A connection still being opened is closed as soon as it arrives; wait for it so
        # nothing outlives close() (an abandoned attempt would leak its connection).
        for attempt in list(self._connectors):
            attempt.join(max(1.0, float(self._connect_timeout or 10)))

    # -- the background worker ---------------------------------------------------------

    def _tick(self) -> float:
        now = monotonic()
        with self._lock:
            gone = self._take_reclaimed()
        self._report_reclaimed(gone)
        for key, (deadline, conn) in list(self._deadlines.items()):
            if now > deadline:
                logger.warning(
                    "pool %r: a commit/rollback/reset ran past its %.0f s deadline "
                    "(network unresponsive?): its connection is cut",
                    self.name,
                    self.timeout,
                )
                self._deadlines.pop(key, None)
                cut(conn)
        # Read each time: tests (and users) may change the interval on a live pool.
        if now >= self._last_housekeeping + self.housekeeping_interval:
            self._last_housekeeping = now
            self._fold()
            self._leak_scan(now)
            self._expire(now)
            interval = self.config.keepalive_interval
            if interval:
                self._keepalive(now, interval)
        return min(
            self._plan_connects(now), self._last_housekeeping + self.housekeeping_interval - now
        )

    def _plan_connects(self, now: float) -> float:
        """Start the connection attempts the pool needs; seconds until the next decision."""
        with self._lock:
            if self._closed or self._draining:
                return self.housekeeping_interval
            busy = self._nconns + self._connecting
            need = max(self._min_size - busy, len(self._waiting) - self._connecting)
            need = min(need, self._max_size - busy, self.num_workers - self._connecting)
            if need <= 0:
                return self.housekeeping_interval
            if self._failures:
                if self._waiting:
                    wait = RETRY_WHILE_WAITING
                else:
                    # Doubling per retry made while failing (attempts made together at the
                    # start fail together and count once).
                    wait = min(MAX_BACKOFF, FIRST_BACKOFF * 2**self._retries)
                    wait *= random.uniform(0.8, 1.0)
                    if self._connecting:
                        return self.housekeeping_interval
                wait -= now - self._last_attempt
                if self._reconnect_failed is not None and self._failing_since:
                    # Try again when reconnect_timeout runs out, so that the callback comes
                    # on time rather than at the next backoff step.
                    due = self._failing_since + self.reconnect_timeout - now
                    wait = min(wait, max(0.0, due))
                if wait > 0:
                    return wait
                # While failing, one attempt at a time.
                need = 0 if self._connecting else 1
                self._retries += need
            self._connecting += need
            self._last_attempt = now
        self._connectors = {w for w in self._connectors if w.is_alive()}
        for _ in range(need):
            worker = spawn(_connect_worker, ref(self), name=f"{self.name}-connect")
            self._connectors.add(worker)
        return self.housekeeping_interval

    def _add_connection(self) -> bool:
        """One connection attempt; True if the pool now holds min_size connections."""
        t0 = monotonic()
        try:
            conn = self._connect()
        except BaseException as ex:
            with self._lock:
                self._connecting -= 1
            if self._closed:
                return False
            self._note_connect_failure(ex, t0)
            if not isinstance(ex, Exception):
                raise
            return False
        took = monotonic() - t0
        slot = Slot(conn, t0 + took, t0 + took + self.max_lifetime * random.uniform(0.95, 1.0))
        slot.cls, slot.guarded = self._handle_classes(slot.cls)
        with self._lock:
            self._connecting -= 1
            if self._closed:
                _psycopg.close_now(conn)
                return False
            self._nconns += 1
            self._n_created += 1
            was_failing = self._outage
            self._outage = False
            self._failures = 0
            self._retries = 0
            self._last_error = ""
            self._permanent_fix = None
            self._failing_since = 0.0
            self._connect_hist.add(took)
            self._put_idle_locked(slot)
            full = self._nconns >= self._min_size
        if was_failing:
            self._event("recovered", "new connection established")
            logger.info("pool %r: connecting works again", self.name)
        self._wakeup.set()
        return full

    def _connect(self) -> CT:
        """A new connection, configured: the one place where the pool connects."""
        conninfo = self.conninfo
        if callable(conninfo):
            conninfo = ensure(conninfo())
        kwargs = self.kwargs
        kwargs = dict(ensure(kwargs())) if callable(kwargs) else dict(kwargs)
        password = kwargs.get("password")
        if callable(password):
            kwargs["password"] = ensure(password())
        if self._connect_timeout and "connect_timeout" not in kwargs:
            kwargs["connect_timeout"] = self._connect_timeout
        conn = self.connection_class.connect(cast(str, conninfo), **kwargs)
        try:
            _psycopg.set_pool(conn, None)  # pooled, not lent (psycopg's convention)
            if self._configure is not None:
                ensure(self._configure(conn))
                if (status := conn.pgconn.transaction_status) != _IDLE:
                    raise ProgrammingError(
                        f"connection left in status {TransactionStatus(status).name} by "
                        f"configure function {self._configure}: discarded"
                    )
            if self._auto:
                # After configure: the cursor classes it chose (ClientCursor, say) are
                # the ones to track.
                _psycopg.install_tracking(conn)
            # After configure too: the adapters it registered are every borrower's.
            _psycopg.install_adapters(conn)
            # The configure callback's own SETs are the session's baseline, not dirt.
            _psycopg.DIRTY.pop(_psycopg.state_key(conn), None)
        except BaseException:
            _psycopg.close_now(conn)
            raise
        return conn

    def _note_connect_failure(self, error: BaseException, t0: float) -> None:
        fix = permanent_fix(error) if isinstance(error, Exception) else None
        with self._lock:
            self._n_failed += 1
            self._failures += 1
            self._last_attempt = max(self._last_attempt, t0)
            self._last_error = describe_error(error)
            self._permanent_fix = fix
            if not self._failing_since:
                self._failing_since = t0
            new_outage = not self._outage
            self._outage = True
            give_up = monotonic() - self._failing_since >= self.reconnect_timeout
            if give_up:
                # Told once per reconnect_timeout of failures (psycopg_pool tells each
                # time it gives up); retrying goes on, its backoff started afresh.
                self._failing_since = monotonic()
                self._retries = 0
            if fix is not None and not self._nconns:
                # Waiting cannot help: tell every waiter now, cause first.
                error_now = ConnectFailed(self._connect_failed_message())
                waiting = list(self._waiting)
                self._waiting.clear()
                for w in waiting:
                    w.fail(error_now)
        (logger.warning if new_outage else logger.debug)(
            "pool %r: connecting to %s failed: %s", self.name, self._dsn(), self._last_error
        )
        if new_outage:
            self._event("connect-failed", self._last_error)
        self._filled.set()
        self._wakeup.set()
        if give_up and self._reconnect_failed is not None:
            try:
                ensure(self._reconnect_failed(self))
            except Exception as ex:
                logger.warning("pool %r: reconnect_failed callback failed: %s", self.name, ex)

    def _check_failed(self, slot: Slot, error: Exception) -> None:
        with self._lock:
            self._n_valid_fail += 1
            fresh = not slot.checked
        logger.warning("pool %r: check failed: %s", self.name, describe_error(error))
        self._retire(slot)
        if fresh:
            # A brand-new connection failing its check: retry connecting with backoff,
            # as for a failed connection attempt, instead of a tight loop.
            self._note_connect_failure(error, monotonic())

    def _connect_failed_message(self) -> str:
        return (
            f"{self._last_error} (pool {self.name!r} connecting to {self._dsn()}): "
            f"{self._permanent_fix}; the pool keeps retrying in the background"
        )


def _ident() -> int:
    from threading import get_ident

    return get_ident()


def _maintain(pool_ref: ref[Lifecycle[Any]]) -> None:
    """The pool's background worker: connect, refill, expire, keep alive, watch deadlines.

    It holds the pool only between two ticks, through a weak reference: a pool dropped
    without close() is collected, and its worker ends.
    """
    while True:
        pool = pool_ref()
        if pool is None or pool._closed:
            return
        wakeup = pool._wakeup
        wakeup.clear()
        try:
            delay = pool._tick()
        except BaseException as ex:
            if pool._closed:
                return
            if not isinstance(ex, Exception):
                raise
            logger.exception("pool %r: maintenance failed (continuing): %s", pool.name, ex)
            delay = 1.0
        del pool
        wakeup.wait(delay)


def _connect_worker(pool_ref: ref[Lifecycle[Any]]) -> None:
    """One background connection attempt, holding the pool no longer than it needs to."""
    pool = pool_ref()
    if pool is None:
        return
    filled = pool._filled
    full = pool._add_connection()
    del pool
    # After letting go of the pool: wait() may return, and the caller drop the pool, now.
    if full:
        filled.set()
