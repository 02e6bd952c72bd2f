"""What Pool and AsyncPool share without I/O: the pool's state, counters, stats and messages."""

from __future__ import annotations

import threading
import weakref
from collections import deque
from time import monotonic
from typing import Any

from psycopg.conninfo import make_conninfo

from . import _fork, _psycopg
from ._config import PoolConfig, mask_conninfo
from ._errors import ConnectionReturned, PoolClosed
from ._leaks import note_late_return, warn_leak
from ._messages import state_line
from ._slot import Slot
from ._stats import Histogram

# psycopg_pool's get_stats() keys that are counters (pop_stats() resets them).
_COUNTERS = (
    "requests_num",
    "requests_queued",
    "requests_wait_ms",
    "requests_errors",
    "usage_ms",
    "returns_bad",
    "connections_num",
    "connections_ms",
    "connections_errors",
    "connections_lost",
)


class PoolCore:
    """The shared, I/O-free half of Pool and AsyncPool. Every field is guarded by `_lock`."""

    name: str
    config: PoolConfig
    _lock: threading.Lock
    _idle: deque[Slot]
    _waiting: deque[Any]
    _worker: Any
    _forked: bool
    housekeeping_interval = 1.0  # seconds; tests shrink it
    _num_pool = 0

    def _init_core(self, config: PoolConfig, name: str | None) -> None:
        self.config = config
        if not name:
            PoolCore._num_pool += 1
            name = f"pool-{PoolCore._num_pool}"
        self.name = name
        self._min_size = config.min_size
        self._max_size = config.resolved_max_size
        self.timeout = config.timeout
        self.max_waiting = config.max_waiting
        self.max_lifetime = config.max_lifetime
        self.max_idle = config.max_idle
        self.reconnect_timeout = config.reconnect_timeout
        self.num_workers = config.num_workers
        self._fifo = config.lend_order == "fifo"
        self._leak_threshold = config.leak_threshold or 0.0
        self._capture_stack = config.leak_capture_stack
        self._bypass = config.validation_bypass if config.validate else float("inf")
        # Borrows whose connection was idle for less than this are lent with no round
        # trip (only the socket peek): the validation bypass window, capped by max_idle.
        self._fast_window = min(self._bypass, config.max_idle)
        self._lock = threading.Lock()
        self._reset_state()
        self._handle_cls: dict[type, tuple[type, type]] = {}
        _fork.track(self)

    def _reset_state(self) -> None:
        """Fresh state: at creation, and in a forked child (which owns none of the parent's)."""
        self._idle = deque()
        self._lent: dict[int, Slot] = {}
        self._parked: dict[int, Slot] = {}
        self._waiting = deque()
        # Handles collected while lent: (id, the connection's shared dict), queued by the
        # handle's __del__ and settled under the lock by _take_reclaimed().
        self._reclaim: deque[tuple[int, dict[str, Any]]] = deque()
        self._reclaimed_late: list[Slot] = []  # settled while booking, not reported yet
        self._nconns = 0  # open connections: idle + lent + parked + being checked
        self._connecting = 0  # connection attempts in flight
        self._closed = True
        self._opened = False
        self._draining = False
        self._invalid_before = 0.0  # idle connections created before this are stale
        self._last_error = ""  # the last connection attempt's error, masked
        self._permanent_fix: str | None = None  # set while connecting fails for good
        self._failing_since = 0.0
        self._events: deque[tuple[float, str, str]] = deque(maxlen=200)
        self._tag_hold: dict[str, Histogram] = {}
        self._wait_hist = Histogram()
        self._hold_hist = Histogram()
        self._connect_hist = Histogram()
        # Samples are queued on the hot path (deque.append is atomic and cheap) and
        # folded into the histograms by readers and housekeeping.
        self._wait_q: deque[float] = deque()
        self._hold_q: deque[tuple[str | None, float]] = deque()
        self._unparks: deque[None] = deque()
        self._fold_lock = threading.Lock()
        self._pop_lock = threading.Lock()  # one pop_stats() at a time
        self._popped: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self._n_fast = 0  # borrows served from idle with no wait and no round trip
        self._n_queued = 0
        self._n_timeouts = 0
        self._n_rejected = 0
        self._n_created = 0
        self._n_closed = 0
        self._n_failed = 0
        self._n_lost = 0
        self._n_leaks = 0
        self._n_reclaimed = 0
        self._n_valid_run = 0
        self._n_valid_skip = 0
        self._n_valid_fail = 0
        self._n_resets = 0
        self._n_stolen = 0
        self._n_bad_returns = 0  # returned closed, broken or mid-operation
        self._failed_wait = 0.0

    # -- psycopg_pool's public attributes ----------------------------------------------

    @property
    def min_size(self) -> int:
        return self._min_size

    @property
    def max_size(self) -> int:
        return self._max_size

    @property
    def closed(self) -> bool:
        """True until open() and after close()."""
        return self._closed

    @property
    def _pool(self) -> list[Any]:
        """The idle connections (psycopg_pool's attribute name, read by its test suite)."""
        return [s.conn for s in self._idle]

    def __repr__(self) -> str:
        cls = type(self)
        return f"<{cls.__module__}.{cls.__name__} {self.name!r} at 0x{id(self):x}>"

    # -- guards and slots ----------------------------------------------------------------

    def _handle_classes(self, cls: type[Any]) -> tuple[type[Any], type[Any]]:
        """The classes of the handles lent on connections of class `cls`: while lent, and
        once returned (refusing any use). See _psycopg.handle_classes()."""
        pair = self._handle_cls.get(cls)
        if pair is None:
            # Weak: a handle kept after its return must not keep the pool alive (its threads
            # and connections would outlive every reference to it).
            pool_ref = weakref.ref(self)

            def refuse(conn: Any) -> BaseException:
                pool = pool_ref()
                if pool is None:
                    return ConnectionReturned("this connection was returned to a closed pool")
                return pool._refuse_returned(conn)

            def reclaim(key: int, state: dict[str, Any]) -> None:
                # Maybe inside the garbage collector, while this thread holds the pool's
                # lock: only queue; the pool settles the books later.
                pool = pool_ref()
                if pool is not None:
                    pool._reclaim.append((key, state))

            pair = self._handle_cls[cls] = _psycopg.handle_classes(cls, refuse, reclaim)
        return pair

    def _refuse_returned(self, conn: Any) -> ConnectionReturned:
        """The error for any use of a handle after its return (see _psycopg.handle_classes)."""
        state = conn.__dict__
        where = ""
        for slot in list(self._idle):
            if slot.conn is not None and slot.conn.__dict__ is state:
                where = f" (last borrowed at {slot.site}, returned at {slot.return_site})"
        for slot in list(self._lent.values()):
            if slot.conn is not None and slot.conn.__dict__ is state:
                where = (
                    f" (returned at {slot.return_site}); its server connection is lent "
                    f"again, now to the borrower at {slot.site}"
                )
        return ConnectionReturned(
            f"this connection was returned to pool {self.name!r}{where}: nothing was sent. "
            "Use a connection only inside its `with pool.connection()` block, or until "
            "putconn(); each borrow gets its own connection object."
        )

    def _book(self, book: dict[int, Slot], key: int, slot: Slot) -> None:
        """book[key] = slot (lock held), settling first a collected handle whose id it was."""
        if book.setdefault(key, slot) is not slot:
            # Another slot under this id: its handle was collected (a live handle has an id
            # of its own), and the id reused before the pool settled it.
            self._reclaimed_late.extend(self._take_reclaimed())
            old = book.get(key)
            if old is not None and old is not slot:
                self._n_reclaimed += 1
                if self._parked.get(key) is old:
                    del self._parked[key]
                old.parked = False
                self._reclaimed_late.append(old)
            book[key] = slot

    # -- parked slots (see Pool._park) ------------------------------------------------
    #
    # A parked slot stays booked in _lent and is also in _parked (never only there): it
    # belongs to whoever pops it from _parked. The parker's _unpark() pops without the
    # lock; everyone else holds it.

    def _in_use(self) -> list[Slot]:
        """The slots lent and not parked."""
        return [s for s in list(self._lent.values()) if not s.parked]

    def _n_in_use(self) -> int:
        """How many slots are lent and not parked (exact with the lock held)."""
        return len(self._lent) - len(self._parked)

    def _unbook_parked(self, key: int, slot: Slot) -> None:
        """Take a slot just popped from _parked off the books and refuse its handle (lock held)."""
        if self._lent.get(key) is slot:
            del self._lent[key]
        slot.disown()

    def _steal_due_locked(self) -> Slot | None:
        """A parked slot for a borrower with nothing idle (lock held), when no new
        connection is coming for it: at max_size, or while connecting fails. Else None."""
        if self._parked and (
            self._nconns + self._connecting >= self._max_size or self._failing_since
        ):
            return self._steal_locked()
        return None

    def _steal_locked(self) -> Slot | None:
        """A parked slot taken from its parker (lock held), or None if none is left."""
        parked = self._parked
        while parked:
            try:
                key, slot = parked.popitem()
            except KeyError:  # unparked meanwhile
                return None
            handle = slot.wr()  # held until disowned: collected in between, its reclaim
            if handle is None:  # could match the next handle given the same id
                # Collected unreturned: the reclaim settles the slot.
                slot.parked = False
                continue
            self._unbook_parked(key, slot)
            del handle
            self._n_stolen += 1
            return slot
        return None

    # -- accounting (called with the lock held) ----------------------------------------

    def _late_return(self, slot: Slot, now: float) -> None:
        held = now - slot.t0
        note_late_return(self.name, slot, held)
        self._event("leak-returned", f"{slot.site} after {held:.1f} s")

    def _event(self, kind: str, detail: str) -> None:
        self._events.append((monotonic(), kind, mask_conninfo(detail)))

    def _leak_scan(self, now: float) -> None:
        threshold = self._leak_threshold
        if not threshold:
            return
        with self._lock:
            due = [
                s
                for s in self._lent.values()
                if not s.warned and not s.parked and now - s.t0 >= threshold
            ]
            for s in due:
                s.warned = True
                self._n_leaks += 1
        for s in due:
            warn_leak(self.name, s, now, threshold)
            self._event("leak-suspect", f"{s.site} out for {now - s.t0:.1f} s")

    # -- messages ----------------------------------------------------------------------

    def _state_line(self) -> str:
        return state_line(
            self._nconns,
            self._min_size,
            self._max_size,
            len(self._idle),
            self._n_in_use(),
            len(self._waiting),
        )

    def _dsn(self) -> str:
        conninfo = getattr(self, "conninfo", "")
        if not isinstance(conninfo, str):
            return "<callable conninfo>"
        kwargs = getattr(self, "kwargs", None)
        if isinstance(kwargs, dict):
            where = {k: v for k, v in kwargs.items() if k in ("host", "port", "dbname", "user")}
            if where:
                try:
                    return mask_conninfo(make_conninfo(conninfo, **where))
                except Exception:
                    pass
        return mask_conninfo(conninfo) if conninfo else "<libpq defaults>"

    def _cannot_connect(self) -> bool:
        """True when no connection exists and connecting is failing."""
        return bool(self._last_error) and not self._idle and self._nconns == self._n_in_use()

    def _timeout_message(self, waited: float) -> str:
        head = f"couldn't get a connection from pool {self.name!r} after {waited:.2f} s"
        if self._cannot_connect():
            # Nothing can connect: the cause is the news, sizing advice would mislead.
            return (
                f"{self._last_error}: {head}: connecting to {self._dsn()} is failing "
                f"({self._state_line()})"
            )
        msg = f"{head}: {self._state_line()}"
        longest = max(self._in_use(), key=lambda s: -s.t0, default=None)
        if longest is not None:
            msg += (
                f"; longest borrow: {longest.held_for:.2f} s by {longest.owner_name()} "
                f"at {longest.site}"
            )
        return msg + (
            ". Raise max_size or timeout, shorten the work done while holding a "
            "connection, or set leak_threshold to log the stacks of long borrows."
        )

    def _closed_error(self) -> PoolClosed:
        if self._draining and not self._closed:
            return PoolClosed(f"the pool {self.name!r} is closing: it lends no more connections")
        if not self._opened:
            return PoolClosed(f"the pool {self.name!r} is not open yet: call open() first")
        return PoolClosed(f"the pool {self.name!r} is already closed")

    # -- fork --------------------------------------------------------------------------

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's connections without touching them.

        I/O-free, so it runs in the at-fork hook: the child gets fresh locks and counters,
        and its first borrow starts its own background worker.
        """
        slots = [*self._idle, *self._lent.values()]  # (parked slots are in _lent too)
        was_open = not self._closed
        _fork.orphan([s.conn for s in slots if s.conn is not None])
        self._lock = threading.Lock()
        self._reset_state()
        # The parent's events, worker handles and deadlines are not ours either (a lock
        # inside an event may have been held by a parent thread at the fork).
        self._init_lifecycle()
        self._closed = not was_open
        self._opened = was_open
        self._forked = was_open

    def _init_lifecycle(self) -> None:
        """The lifecycle's own state (see AsyncLifecycle/Lifecycle)."""

    def _take_reclaimed(self) -> list[Slot]:
        """Slots of handles collected while lent, taken off the books (lock held).

        Their connections are still open (the pool's own object holds them): the caller
        closes them (_report_reclaimed), since their borrower's state is unknown.
        """
        out: list[Slot] = []
        while self._reclaim:
            key, state = self._reclaim.popleft()
            slot = self._lent.get(key)
            if slot is not None and slot.conn is not None and slot.conn.__dict__ is state:
                del self._lent[key]
                if self._parked.get(key) is slot:
                    del self._parked[key]
                slot.parked = False
                out.append(slot)
        self._n_reclaimed += len(out)
        if self._reclaimed_late:
            out += self._reclaimed_late
            self._reclaimed_late = []
        return out
