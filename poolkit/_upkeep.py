# WARNING: generated from poolkit/_upkeep_async.py by scripts/async_to_sync.py: do not edit.
# Edit the async source, then run `python scripts/async_to_sync.py`.
"""Pool's upkeep of idle connections: hand-off, expiry, keepalive, checks and disposal.

Generated from poolkit/_upkeep_async.py: edit that file, not this one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from time import monotonic
from typing import Any, Generic, TypeVar, cast

from psycopg import Connection, ProgrammingError
from psycopg.pq import TransactionStatus

from . import _psycopg, _reset
from ._compat import Event, Waiter, ensure
from ._conn import check_result, drain_gen, ping_gen
from ._leaks import logger, warn_reclaimed
from ._reporting import Reporting
from ._slot import Slot

CT = TypeVar("CT", bound=Connection[Any])

_IDLE = TransactionStatus.IDLE


class Upkeep(Reporting, Generic[CT]):
    """Idle connections: who gets one next, which to retire, which to check."""

    _configure: Callable[[CT], Any] | None
    _auto: bool  # reset="auto": track session commands (set by the pool)
    _wakeup: Event
    _last_attempt: float
    _outage: bool

    def _put_idle_locked(self, slot: Slot) -> None:
        """Hand a ready slot to the first waiter still waiting, or make it idle (lock held)."""
        if self._closed:
            self._idle.append(slot)  # close() or the next tick disposes of it
            return
        waiting = self._waiting
        while waiting:
            if waiting.popleft().set(slot):
                return
        self._idle.append(slot)

    def _new_waiter(self) -> Waiter:
        return Waiter()

    def _forget_waiter(self, waiter: Waiter) -> None:
        with contextlib.suppress(ValueError):
            self._waiting.remove(waiter)

    def _expire(self, now: float) -> None:
        """Close idle and parked connections past max_lifetime, or past max_idle above min."""
        with self._lock:
            old = []
            extra = self._nconns - self._min_size
            for s in list(self._idle):
                if s.pending is not None and now - s.returned_at < 1.0:
                    continue
                if now >= s.expire_at or s.created_at < self._invalid_before:
                    old.append(s)
                elif now - s.returned_at > self.max_idle and extra > 0:
                    old.append(s)
                    extra -= 1
            for s in old:
                self._idle.remove(s)
            for key, s in list(self._parked.items()):
                stale = (
                    now >= s.expire_at
                    or now - s.returned_at > self.max_idle
                    or s.created_at < self._invalid_before  # older than a connection loss
                )
                # Popped, not deleted: its parker may have unparked it meanwhile.
                if stale and self._parked.pop(key, None) is s:
                    self._unbook_parked(key, s)
                    old.append(s)
        for s in old:
            self._retire(s)

    def _keepalive(self, now: float, interval: float) -> None:
        with self._lock:
            due = [s for s in self._idle if now - s.returned_at >= interval]
            for s in due:
                self._idle.remove(s)
        for slot in due:
            self._recheck(slot, now + self.timeout)

    def _recheck(self, slot: Slot, deadline: float) -> None:
        """Ping an idle slot taken out of the pool; back to idle if it answered."""
        if self._ping(slot, deadline):
            slot.returned_at = monotonic()
            with self._lock:
                self._put_idle_locked(slot)

    def _ping(self, slot: Slot, deadline: float) -> bool:
        """One round trip on an idle slot (after reading any pending reset)."""

        conn = slot.conn
        try:
            if slot.pending is not None and not self._drain_reset(slot, deadline):
                return False
            with self._lock:
                self._n_valid_run += 1
            try:
                check_result(
                    conn.wait(ping_gen(conn.pgconn), timeout=max(0.001, deadline - monotonic()))
                )
            except Exception:
                with self._lock:
                    self._n_valid_fail += 1
                self._lost(slot)
                return False
        except BaseException:
            if slot.conn is not None:
                self._retire(slot)
            raise
        slot.last_good = monotonic()
        return True

    def check(self) -> None:
        """Validate every idle connection now; replace the broken ones, refill to min_size."""
        with self._lock:
            slots = list(self._idle)
            self._idle.clear()
        now = monotonic()
        for slot in slots:
            self._recheck(slot, now + self.timeout)
        with self._lock:
            self._last_attempt = 0.0  # a refill may start at once
        self._wakeup.set()

    def resize(self, min_size: int, max_size: int | None = None) -> None:
        """Change the pool's size limits; the worker grows or shrinks it to match."""
        if max_size is None:
            max_size = min_size
        if min_size < 0 or max_size < min_size or max_size < 1:
            raise ValueError(f"bad sizes: min_size={min_size}, max_size={max_size}")
        with self._lock:
            self._min_size, self._max_size = min_size, max_size
        self._wakeup.set()

    def drain(self) -> None:
        """Replace every connection: idle ones now, lent ones when they come back."""
        with self._lock:
            self._invalid_before = monotonic()
            slots = list(self._idle)
            self._idle.clear()
            self._last_attempt = 0.0  # reconnect at once, even after failures
            self._permanent_fix = None  # new credentials may work: borrowers wait for them
        for s in slots:
            self._retire(s)
        self._wakeup.set()

    def rotate(self) -> None:
        """Replace every connection gracefully, for rotated credentials or certificates.

        New connections call `conninfo`/`kwargs`/`password` again when they are callables.
        Idle connections are closed now, lent ones when they come back; borrowers never
        see an error for it.
        """
        self.drain()

    @staticmethod
    def check_connection(conn: CT) -> None:
        """A `check=` callback that runs an empty query (psycopg_pool's name)."""

        check_result(conn.wait(ping_gen(conn.pgconn)))

    def _retire(self, slot: Slot) -> None:
        """Close a connection now (no I/O wait) and take it off the books."""
        conn = slot.conn
        slot.conn = None
        with self._lock:
            self._nconns -= 1
            self._n_closed += 1
        if conn is not None:
            _psycopg.close_now(conn)
            _psycopg.DIRTY.pop(_psycopg.state_key(conn), None)
        self._wakeup.set()

    def _lost(self, slot: Slot) -> None:
        """A connection is found broken: so is every idle one older than its last success.

        Only those: a connection opened after the lost one last worked may well be fine,
        and closing it too would start a reconnect storm after an outage. Not even those
        when the server said it ended this session alone (a session timeout): the others
        are fine, and replacing them all would be a storm of its own.
        """
        reason = _psycopg.session_ended(slot.conn)
        if reason is not None:
            logger.warning(
                "pool %r: the server ended one connection's session (%s): replacing it",
                self.name,
                reason,
            )
            self._retire(slot)
            return
        with self._lock:
            self._n_lost += 1
            self._invalid_before = max(self._invalid_before, slot.last_good)
            stale = [s for s in self._idle if s.created_at < self._invalid_before]
            for s in stale:
                self._idle.remove(s)
            # One event per outage: the first loss opens it, the next new connection
            # closes it ("recovered"), however many broken connections come back between.
            new_outage = not self._outage
            self._outage = True
        if new_outage:
            self._event("connection-lost", f"{len(stale)} older idle connections invalidated")
        logger.warning(
            "pool %r: connection lost; replacing it and %d older idle connections",
            self.name,
            len(stale),
        )
        for s in (slot, *stale):
            self._retire(s)

    def _drain_reset(self, slot: Slot, deadline: float) -> bool:
        """Read the answer to the reset sent when the connection came back."""

        conn = slot.conn
        sql = slot.pending
        try:
            timeout = max(0.001, deadline - monotonic())
            check_result(conn.wait(drain_gen(conn.pgconn), timeout=timeout))
            slot.pending = None
            if sql is not None and (b"UNLISTEN" in sql or sql == b"DISCARD ALL"):
                _psycopg.forget_notifies(conn)  # received before the UNLISTEN: not theirs
            if self._configure is not None and sql is not None and _reset.undoes_configure(sql):
                ensure(self._configure(cast(CT, conn)))
                if self._auto:
                    _psycopg.install_tracking(conn)  # (configure may set cursor classes)
                _psycopg.install_adapters(conn)  # (and register adapters)
                if conn.pgconn.transaction_status != _IDLE:
                    raise ProgrammingError("configure function left a transaction open")
            _psycopg.DIRTY.pop(_psycopg.state_key(conn), None)
        except Exception:
            self._lost(slot)
            return False
        slot.last_good = monotonic()
        return True

    def _report_reclaimed(self, slots: list[Slot]) -> None:
        """Close the connections of borrows collected unreturned (their state is unknown)."""
        for slot in slots:
            warn_reclaimed(self.name, slot)
            self._event("leak-reclaimed", slot.site)
            self._retire(slot)
        if slots:
            self._wakeup.set()
