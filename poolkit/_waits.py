# WARNING: generated from poolkit/_waits_async.py by scripts/async_to_sync.py: do not edit.
# Edit the async source, then run `python scripts/async_to_sync.py`.
"""Pool's borrows that cannot be lent at once: waiting in line, and readying a slot.

Generated from poolkit/_waits_async.py: edit that file, not this one.
"""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic
from typing import Any, Generic, TypeVar, cast

from psycopg import Connection
from psycopg.pq import TransactionStatus

from ._compat import ensure
from ._errors import ConnectFailed, PoolTimeout, TooManyRequests
from ._leaks import logger
from ._peek import PEEK_AFTER
from ._returns import Returns
from ._slot import Slot

CT = TypeVar("CT", bound=Connection[Any])

_IDLE = TransactionStatus.IDLE


class Waits(Returns[CT], Generic[CT]):
    """A slot for a borrower when none is lendable as it is: queue, steal, validate."""

    _check_fn: Callable[[CT], Any] | None  # the user's check=: None for the built-in one
    _peek: bool
    _fifo: bool

    def _take_slot(self, t0: float, deadline: float) -> Slot:
        """An idle slot, a stolen parked one, or one handed over after a wait in line."""
        with self._lock:
            if self._closed or self._draining:
                raise self._closed_error()
            if self._forked:
                self._forked = False
                self._start_worker()
            gone = self._take_reclaimed()
            if self._idle:
                return self._idle.popleft() if self._fifo else self._idle.pop()
            # Nothing idle, and no new connection coming: take a connection parked by a
            # thread between two requests (Django's CONN_MAX_AGE) rather than wait.
            stolen = self._steal_due_locked()
            if stolen is None:
                if self._permanent_fix and not self._nconns:
                    raise ConnectFailed(self._connect_failed_message())
                if self.max_waiting and len(self._waiting) >= self.max_waiting:
                    self._n_rejected += 1
                    raise TooManyRequests(
                        f"the pool {self.name!r} has already {len(self._waiting)} requests "
                        f"waiting ({self._state_line()}): raise max_waiting or max_size"
                    )
                waiter = self._new_waiter()
                self._waiting.append(waiter)
                # A parker offers its slot without the lock, then looks at the line
                # (Pool._park): looking again after joining it, one of the two sees
                # the other.
                stolen = self._steal_due_locked()
                if stolen is not None:
                    self._waiting.pop()
            if stolen is None:
                self._n_queued += 1
                # Wake the worker only if it can open a connection for this borrower: at
                # max_size, a return hands one over without it.
                grow = self._nconns + self._connecting < self._max_size
        self._report_reclaimed(gone)
        if stolen is not None:
            if self._recycle_or_close(stolen, monotonic()):
                return stolen
            # Disposed of (and counted) by _recycle(): look again, as if never taken.
            return self._take_slot(t0, deadline)
        if grow:
            self._wakeup.set()
        try:
            resolved = waiter.wait(deadline)
        except BaseException:
            # Cancelled while in line: a connection handed over meanwhile goes back.
            with self._lock:
                if waiter.give_up():
                    self._forget_waiter(waiter)
                    handed = None
                else:
                    handed = waiter.item
                    if handed is not None:
                        self._put_idle_locked(handed)
            raise
        if resolved:
            # Settled by a hand-off or an error before the wait ended: no lock needed
            # (one lock round less per contended borrow).
            if waiter.error is not None:
                raise waiter.error
            return cast(Slot, waiter.item)
        with self._lock:
            if waiter.give_up():
                self._forget_waiter(waiter)
                self._n_timeouts += 1
                self._failed_wait += monotonic() - t0
                timed_out = True
            else:
                timed_out = False
        if not timed_out:
            if waiter.error is not None:
                raise waiter.error
            return cast(Slot, waiter.item)
        self._event("timeout", self._state_line())
        raise PoolTimeout(self._timeout_message(monotonic() - t0))

    def _ready(self, slot: Slot, deadline: float) -> bool:
        """Make a slot taken from idle ready to lend, or dispose of it and return False.

        Round trips are bounded by the borrower's deadline: a black-holed network costs
        the borrower its timeout, never more. A cancellation at any closes the
        connection and gives its slot back to the pool's books (never lost).
        """
        conn = slot.conn
        try:
            now = monotonic()
            if slot.pending is not None and not self._drain_reset(slot, deadline):
                return False
            if now >= slot.expire_at or slot.created_at < self._invalid_before:
                self._retire(slot)
                return False
            idle_for = now - slot.returned_at
            if idle_for > self.max_idle:
                # Idle past max_idle: a firewall may have dropped it silently; a ping could
                # hang until TCP gives up, so replace it instead.
                self._retire(slot)
                return False
            if self._check_fn is not None and (idle_for >= self._bypass or not slot.checked):
                with self._lock:
                    self._n_valid_run += 1
                try:
                    ensure(self._check_fn(cast(CT, conn)))
                    if conn.pgconn.transaction_status != _IDLE:
                        # A check= that queried outside autocommit opened a transaction:
                        # the check's, not the borrower's (the safety net below would
                        # close every connection, new ones included, in a tight loop).
                        conn.rollback()
                except Exception as ex:
                    self._check_failed(slot, ex)
                    return False
                slot.checked = True
                slot.last_good = monotonic()
            else:
                # Outside the bypass window, or a socket that spoke while idle: make sure.
                broken = (
                    self._peek
                    and idle_for >= PEEK_AFTER
                    and not slot.peek.quiet(conn)
                    and slot.peek.broken(conn)
                )
                if broken:
                    with self._lock:
                        self._n_valid_fail += 1
                    self._lost(slot)
                    return False
                if idle_for >= self._bypass or broken is None:
                    if not self._ping(slot, deadline):
                        return False
                else:
                    with self._lock:
                        self._n_valid_skip += 1
        except BaseException:
            # Cancelled (or worse) mid-check: close it and keep the books, unless what was
            # running had disposed of it already (a failed check= or reset drain).
            if slot.conn is not None:
                self._retire(slot)
            raise
        if conn.pgconn.transaction_status != _IDLE:
            # Safety net: nothing may reach a borrower mid-transaction.
            logger.warning(
                "pool %r: connection found %s at borrow: closed",
                self.name,
                TransactionStatus(conn.pgconn.transaction_status).name,
            )
            self._retire(slot)
            return False
        return True
