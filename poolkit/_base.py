"""What the sync and async pools share that does no I/O: counters, borrow registry, messages."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import logging
import os
import select
import sys
import threading
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from time import monotonic
from types import CodeType, FrameType
from typing import Any

from psycopg.conninfo import make_conninfo

from ._config import PoolConfig, mask_conninfo
from ._stats import Histogram, PoolStats

logger = logging.getLogger("poolkit")
leak_logger = logging.getLogger("poolkit.leak")

# Frames from these directories are skipped when looking for the code that borrowed.
_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _package_dir(name: str) -> str | None:
    # find_spec on a top-level name locates the package without importing it.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(next(iter(spec.submodule_search_locations)), "")


# Frames from these directories are not the borrower: the user's code is further out.
SKIP_PREFIXES: tuple[str, ...] = tuple(
    p
    for p in (
        os.path.join(_PKG_ROOT, "poolkit", ""),
        os.path.join(_PKG_ROOT, "poolkit_fastapi", ""),
        os.path.join(_PKG_ROOT, "poolkit_django", ""),
        # The stdlib modules a borrow passes through (not site-packages, which share a root).
        contextlib.__file__,
        threading.__file__,
        os.path.join(os.path.dirname(os.path.abspath(asyncio.__file__)), ""),
        os.path.join(os.path.dirname(os.path.abspath(concurrent.futures.__file__)), ""),
        *(_package_dir(n) for n in ("fastapi", "starlette", "anyio", "django", "asgiref")),
    )
    if p
)
_RDHUP = getattr(select, "POLLRDHUP", 0)
_HANGUP = select.POLLHUP | select.POLLERR | select.POLLNVAL | _RDHUP
# Idle connections back for less than this are lent without the liveness peek.
PEEK_AFTER = 0.001
_MAX_TAGS = 100
_OTHER_TAG = "(other)"

# Reset statements by policy name; "auto" resets only after a borrow that ran a command
# leaving session state behind (see _conn.tracking_cursor).
RESET_SQL: dict[str, bytes] = {
    "auto": b"RESET ALL; RESET ROLE",
    "reset_all": b"RESET ALL",
    "discard_all": b"DISCARD ALL",
}


# A borrow record is a plain list (cheapest to build on the hot path):
# [t0, code, lineno, thread ident, task, tag, warned, stack-at-borrow].
T0, CODE, LINENO, OWNER, TASK, TAG, WARNED, STACK = range(8)


def new_record(
    t0: float, frame: FrameType | None, task: Any, tag: str | None, capture: bool
) -> list[Any]:
    """Build a borrow record; the pools inline this on their fast path."""
    return [
        t0,
        frame.f_code if frame is not None else None,
        frame.f_lineno if frame is not None else 0,
        threading.get_ident(),
        task,
        tag,
        False,
        traceback.format_stack(frame) if capture and frame is not None else None,
    ]


DEFAULT_CONNECT_TIMEOUT = 10.0


def _sets_connect_timeout(config: PoolConfig) -> bool:
    if "connect_timeout" in config.kwargs:
        return True
    try:
        from psycopg.conninfo import conninfo_to_dict

        return "connect_timeout" in conninfo_to_dict(config.conninfo)
    except Exception:
        return False


class BorrowRecord:
    """A readable view of one borrow record, built only for reports."""

    __slots__ = ("code", "lineno", "owner", "stack", "t0", "tag", "task", "warned")

    def __init__(self, rec: list[Any]) -> None:
        self.t0: float = rec[T0]
        self.code: CodeType | None = rec[CODE]
        self.lineno: int = rec[LINENO]
        self.owner: int = rec[OWNER]
        self.task: Any = rec[TASK]
        self.tag: str | None = rec[TAG]
        self.warned: bool = rec[WARNED]
        self.stack: list[str] | None = rec[STACK]

    @property
    def site(self) -> str:
        where = (
            f"{self.code.co_filename}:{self.lineno} in {self.code.co_name}"
            if self.code is not None
            else "<unknown>"
        )
        return f"{where} [{self.tag}]" if self.tag else where

    def owner_name(self) -> str:
        if self.task is not None:
            name = getattr(self.task, "get_name", None)
            return f"task {name() if name else self.task!r}"
        for t in threading.enumerate():
            if t.ident == self.owner:
                return f"thread {t.name!r}"
        return f"thread {self.owner}"

    def current_stack(self) -> str:
        """Where the borrower is now: the stack that is holding the connection."""
        if self.task is not None:
            try:
                frames = self.task.get_stack()
            except Exception:  # the task may be done or foreign
                return ""
            lines: list[str] = []
            for f in frames:
                lines.extend(traceback.format_stack(f, limit=1))
            return "".join(lines)
        frame = sys._current_frames().get(self.owner)
        return "".join(traceback.format_stack(frame)) if frame is not None else ""


class _NoPoll:
    @staticmethod
    def poll(timeout: int = 0) -> list[Any]:
        return []


@dataclass(frozen=True)
class BorrowInfo:
    """A public view of one current borrow (for dashboards and the doctor)."""

    held_for: float
    site: str
    owner: str
    tag: str | None
    leak_suspect: bool


def borrow_frame(f: FrameType) -> FrameType:
    """The first frame, from f outwards, outside poolkit and the stdlib."""
    for _ in range(8):
        if not f.f_code.co_filename.startswith(SKIP_PREFIXES) or f.f_back is None:
            return f
        f = f.f_back
    return f


class PoolCore:
    """Mixin with the shared, I/O-free state of Pool and AsyncPool."""

    name: str
    _pool: deque[Any]
    _waiting: deque[Any]
    _nconns: int
    _min_size: int
    _max_size: int
    _closed: bool

    housekeeping_interval = 1.0  # seconds; tests shrink it

    def _pk_init(self, config: PoolConfig, check: Callable[..., Any] | None) -> None:
        self.config = config
        self._pk_check = check
        self._pk_validate = config.validate
        self._pk_bypass = config.validation_bypass
        reset = config.reset
        if config.pgbouncer and reset == "auto":
            reset = "none"
        self._pk_reset_callable: Callable[..., Any] | None = reset if callable(reset) else None
        self._pk_reset_sql: bytes | None = RESET_SQL.get(reset) if isinstance(reset, str) else None
        self._pk_reset_auto = reset == "auto"
        self._pk_restore_always = not self._pk_reset_auto and (
            self._pk_reset_sql is not None or self._pk_reset_callable is not None
        )
        self._pk_leak_threshold = config.leak_threshold or 0.0
        # A connection attempt into a black hole must end: unless the user set one,
        # background connects give up after this and are retried with backoff.
        self._pk_connect_timeout: float | None = (
            None if _sets_connect_timeout(config) else DEFAULT_CONNECT_TIMEOUT
        )
        self._pk_capture_stack = config.leak_capture_stack
        self._pk_last_error = ""  # the last connection attempt's error, masked
        self._pk_draining = False
        self._pk_forked = False
        self._pk_fork_lock = threading.Lock()
        self._pk_fork_alock: Any = None  # asyncio.Lock, made in the child's own loop
        self._pk_borrowed: dict[Any, list[Any]] = {}
        self._pk_reclaim: deque[list[Any]] = deque()
        self._pk_gc_cb = self._pk_on_conn_gc
        self._pk_fast_window = min(
            config.validation_bypass if config.validate else float("inf"), config.max_idle
        )
        self._pk_events: deque[tuple[float, str, str]] = deque(maxlen=200)
        self._pk_tag_hold: dict[str, Histogram] = {}
        self._pk_wait_hist = Histogram()
        self._pk_hold_hist = Histogram()
        # Samples are queued on the hot path (deque.append is atomic and cheap) and
        # folded into the histograms by readers and housekeeping, outside any lock.
        self._pk_wait_q: deque[float] = deque()
        self._pk_hold_q: deque[float] = deque()
        self._pk_tag_q: deque[tuple[str, float]] = deque()
        self._pk_fold_lock = threading.Lock()
        self._pk_connect_hist = Histogram()
        self._n_fast = 0  # borrows served from idle without any check beyond the peek
        self._pk_plain_return = self._pk_reset_callable is None and (
            self._pk_reset_sql is None or self._pk_reset_auto
        )
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
        _live_pools.add(self)

    # -- connection bookkeeping --------------------------------------------------------

    def _pk_new_conn(self, conn: Any, connect_seconds: float) -> None:
        """Attach poolkit's per-connection fields to a fresh connection."""
        conn._pk_returned_at = monotonic()
        conn._pk_touched = False
        conn._pk_dirty = None  # the reset statement a borrow made necessary, if any
        conn._pk_pending = None
        conn._pk_wr = None
        poller: Any = _NoPoll
        try:
            poller = select.poll()
            poller.register(conn.pgconn.socket, select.POLLIN | select.POLLPRI | _RDHUP)
        except Exception:  # no socket to watch: the peek is skipped
            poller = _NoPoll
        conn._pk_poll = poller
        self._n_created += 1
        self._pk_connect_hist.add(connect_seconds)

    def _pk_register(
        self, conn: Any, now: float, tag: str | None, task: Any, frame: FrameType
    ) -> None:
        wr = weakref.ref(conn, self._pk_gc_cb)
        conn._pk_wr = wr
        self._pk_borrowed[wr] = new_record(
            now, borrow_frame(frame), task, tag, self._pk_capture_stack
        )

    def _pk_account(self, rec: list[Any], now: float) -> None:
        """Record a finished borrow's hold time; needs no lock."""
        held = now - rec[T0]
        self._pk_hold_q.append(held)
        if rec[TAG] is not None:
            self._pk_tag_q.append((rec[TAG], held))
        if rec[WARNED]:
            self._pk_returned_late(rec, held)

    def _pk_fold(self) -> None:
        """Move queued samples into the histograms (any thread; one folder at a time)."""
        with self._pk_fold_lock:
            self._pk_fold_locked()

    def _pk_fold_locked(self) -> None:
        for q, h in ((self._pk_wait_q, self._pk_wait_hist), (self._pk_hold_q, self._pk_hold_hist)):
            add = h.add
            try:
                while True:
                    add(q.popleft())
            except IndexError:
                pass
        tags = self._pk_tag_hold
        try:
            while True:
                tag, held = self._pk_tag_q.popleft()
                th = tags.get(tag)
                if th is None:
                    key = tag if len(tags) < _MAX_TAGS else _OTHER_TAG
                    th = tags.setdefault(key, Histogram())
                th.add(held)
        except IndexError:
            pass

    def _pk_returned_late(self, rec: list[Any], held: float) -> None:
        if rec[WARNED]:
            r = BorrowRecord(rec)
            leak_logger.info(
                "pool %r: connection borrowed at %s by %s came back after %.1f s",
                self.name,
                r.site,
                r.owner_name(),
                held,
            )
            self._pk_event("leak-returned", f"{r.site} after {held:.1f} s")

    def _pk_on_conn_gc(self, wr: weakref.ref[Any]) -> None:
        # Runs inside the garbage collector, possibly while this pool's lock is held by
        # this same thread: only queue the record, housekeeping gives the slot back.
        rec = self._pk_borrowed.pop(wr, None)
        if rec is not None:
            self._pk_reclaim.append(rec)

    def _pk_take_reclaimed(self) -> list[BorrowRecord]:
        out: list[BorrowRecord] = []
        while self._pk_reclaim:
            rec = BorrowRecord(self._pk_reclaim.popleft())
            out.append(rec)
            self._n_reclaimed += 1
            leak_logger.warning(
                "pool %r: a connection borrowed at %s by %s was garbage-collected without "
                "being returned after %.1f s; its slot is given back to the pool. Return "
                "connections with 'with pool.connection()' or putconn().",
                self.name,
                rec.site,
                rec.owner_name(),
                monotonic() - rec.t0,
            )
            self._pk_event("leak-reclaimed", rec.site)
        return out

    def _pk_leak_scan(self, now: float) -> None:
        threshold = self._pk_leak_threshold
        if not threshold:
            return
        for raw in list(self._pk_borrowed.values()):
            if raw[WARNED] or now - raw[T0] < threshold:
                continue
            raw[WARNED] = True
            rec = BorrowRecord(raw)
            self._n_leaks += 1
            borrow_stack = "\nStack at borrow:\n" + "".join(rec.stack) if rec.stack else ""
            leak_logger.warning(
                "pool %r: connection borrowed at %s by %s has been out for %.1f s "
                "(leak_threshold=%s s). Current stack of the borrower:\n%s%s",
                self.name,
                rec.site,
                rec.owner_name(),
                now - rec.t0,
                threshold,
                rec.current_stack() or "  <not available>\n",
                borrow_stack,
            )
            self._pk_event("leak-suspect", f"{rec.site} out for {now - rec.t0:.1f} s")

    def _pk_event(self, kind: str, detail: str) -> None:
        self._pk_events.append((monotonic(), kind, detail))

    def _pk_invalidate_older(self, now: float) -> list[Any]:
        """Take every idle connection created before now out of the pool; return them."""
        stale = [c for c in self._pool if c._created_at < now]
        if stale:
            keep = [c for c in self._pool if c._created_at >= now]
            self._pool.clear()
            self._pool.extend(keep)
        return stale

    def _pk_socket_broken(self, conn: Any) -> bool:
        """Non-blocking liveness peek: an idle connection's socket should have nothing to read."""
        events = conn._pk_poll.poll(0)
        if not events:
            return False
        if events[0][1] & _HANGUP:
            return True
        # Readable while idle: a NOTIFY or notice, or the server's goodbye (FATAL, then
        # EOF), which may arrive in two reads.
        pgconn = conn.pgconn
        try:
            pgconn.consume_input()
            events = conn._pk_poll.poll(0)
            if events and events[0][1] & _HANGUP:
                return True
            if events:
                pgconn.consume_input()
        except Exception:
            return True
        return bool(pgconn.status != 0)  # 0 == CONNECTION_OK

    # -- reporting ---------------------------------------------------------------------

    def _pk_longest(self) -> tuple[float, BorrowRecord] | None:
        if not self._pk_borrowed:
            return None
        rec = BorrowRecord(min(self._pk_borrowed.values(), key=lambda r: r[T0]))
        return monotonic() - rec.t0, rec

    def _pk_state_line(self) -> str:
        idle = len(self._pool)
        return (
            f"size={self._nconns} (min {self._min_size}, max {self._max_size}), "
            f"idle={idle}, in_use={len(self._pk_borrowed)}, waiting={len(self._waiting)}"
        )

    def _pk_timeout_message(self, waited: float) -> str:
        msg = (
            f"couldn't get a connection from pool {self.name!r} after {waited:.2f} s: "
            f"{self._pk_state_line()}"
        )
        longest = self._pk_longest()
        if longest is not None:
            held, rec = longest
            msg += f"; longest borrow: {held:.2f} s by {rec.owner_name()} at {rec.site}"
        msg += (
            ". Raise max_size or timeout, shorten the work done while holding a "
            "connection, or set leak_threshold to log the stacks of long borrows."
        )
        if self._pk_last_error and not self._pool and self._nconns > len(self._pk_borrowed):
            msg += (
                f" Connecting to {mask_conninfo(self._pk_dsn())} is failing: {self._pk_last_error}"
            )
        return msg

    def _pk_dsn(self) -> str:
        conninfo = getattr(self, "conninfo", "")
        if not isinstance(conninfo, str):
            return "<callable conninfo>"
        kwargs = getattr(self, "kwargs", None)
        if isinstance(kwargs, dict):
            where = {k: v for k, v in kwargs.items() if k in ("host", "port", "dbname", "user")}
            if where:
                try:
                    return make_conninfo(conninfo, **where)
                except Exception:
                    pass
        return conninfo or "<libpq defaults>"

    def borrowed(self) -> list[BorrowInfo]:
        """The connections currently lent out, longest-held first."""
        now = monotonic()
        thr = self._pk_leak_threshold
        out = [
            BorrowInfo(
                held_for=now - r.t0,
                site=r.site,
                owner=r.owner_name(),
                tag=r.tag,
                leak_suspect=bool(thr) and now - r.t0 >= thr,
            )
            for r in map(BorrowRecord, list(self._pk_borrowed.values()))
        ]
        out.sort(key=lambda b: -b.held_for)
        return out

    def events(self) -> list[tuple[float, str, str]]:
        """Recent pool events (monotonic time, kind, detail): losses, recoveries, timeouts."""
        return list(self._pk_events)

    def histograms(self) -> dict[str, Histogram]:
        """Wait/hold/connect histograms (seconds) for metric exporters; wait_time is a copy."""
        self._pk_fold()
        wait = Histogram()
        src = self._pk_wait_hist
        wait.counts = list(src.counts)
        wait.counts[0] += self._n_fast  # immediate borrows are counted apart, see getconn
        wait.count = src.count + self._n_fast
        wait.sum, wait.max = src.sum, src.max
        return {
            "wait_time": wait,
            "hold_time": self._pk_hold_hist,
            "connect_time": self._pk_connect_hist,
        }

    def hold_time_by_tag(self) -> dict[str, Histogram]:
        """Hold-time histograms per borrow tag (route/view), at most 100 tags plus '(other)'."""
        self._pk_fold()
        return dict(self._pk_tag_hold)

    def stats(self) -> PoolStats:
        """A typed snapshot of the pool: gauges, counters and time summaries."""
        self._pk_fold()
        size = self._nconns
        return {
            "name": self.name,
            "size": size,
            "idle": len(self._pool),
            "in_use": len(self._pk_borrowed),
            "waiting": len(self._waiting),
            "min_size": self._min_size,
            "max_size": self._max_size,
            "overflow": max(0, size - self._min_size),
            "borrows": self._pk_wait_hist.count + self._n_fast,
            "timeouts": self._n_timeouts,
            "rejected": self._n_rejected,
            "connections_created": self._n_created,
            "connections_closed": self._n_closed,
            "connections_failed": self._n_failed,
            "connections_lost": self._n_lost,
            "leaks_detected": self._n_leaks,
            "leaks_reclaimed": self._n_reclaimed,
            "validations_run": self._n_valid_run,
            "validations_skipped": self._n_valid_skip + (self._n_fast if self._pk_validate else 0),
            "validations_failed": self._n_valid_fail,
            "resets": self._n_resets,
            "wait_time": self._pk_wait_hist.summary(zeros=self._n_fast),
            "hold_time": self._pk_hold_hist.summary(),
            "connect_time": self._pk_connect_hist.summary(),
        }

    def get_stats(self) -> dict[str, int]:
        """psycopg_pool-compatible counters (see psycopg_pool's docs for the keys)."""
        self._pk_fold()
        w, h, c = self._pk_wait_hist, self._pk_hold_hist, self._pk_connect_hist
        return {
            "pool_min": self._min_size,
            "pool_max": self._max_size,
            "pool_size": self._nconns,
            "pool_available": len(self._pool),
            "requests_waiting": len(self._waiting),
            "requests_num": w.count + self._n_fast + self._n_timeouts + self._n_rejected,
            "requests_queued": w.count - w.counts[0],
            "requests_wait_ms": int(w.sum * 1000),
            "requests_errors": self._n_timeouts + self._n_rejected,
            "usage_ms": int(h.sum * 1000),
            "returns_bad": self._n_lost,
            "connections_num": c.count + self._n_failed,
            "connections_ms": int(c.sum * 1000),
            "connections_errors": self._n_failed,
            "connections_lost": self._n_lost,
        }

    def pop_stats(self) -> dict[str, int]:
        """Like get_stats(); kept for psycopg_pool compatibility (counters are not reset)."""
        return self.get_stats()

    # -- fork --------------------------------------------------------------------------

    def _pk_detach_after_fork(self) -> None:
        """In a forked child: make the parent's sockets unreachable from here.

        Closing them normally would send a Terminate message on a socket the parent
        still uses, so each descriptor is first pointed at /dev/null.
        """
        conns = list(self._pool)
        conns.extend(wr() for wr in list(self._pk_borrowed))
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            for conn in conns:
                if conn is None:
                    continue
                try:
                    fd = conn.pgconn.socket
                except Exception:
                    continue
                with contextlib.suppress(OSError):
                    os.dup2(devnull, fd)
                _orphans.append(conn)
        finally:
            os.close(devnull)
        self._pk_fork_lock = threading.Lock()  # the parent's may be held by a lost thread
        self._pk_fork_alock = None
        self._pk_forked = True


_live_pools: weakref.WeakSet[PoolCore] = weakref.WeakSet()
# Connections inherited from the parent: kept referenced so their finalizers never run
# in the child while it is alive.
_orphans: list[Any] = []


def _after_fork_in_child() -> None:
    for pool in list(_live_pools):
        try:
            pool._pk_detach_after_fork()
        except Exception:  # never break the child's start
            logger.exception("pool %r: could not detach after fork", pool.name)


os.register_at_fork(after_in_child=_after_fork_in_child)
