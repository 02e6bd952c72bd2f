"""The threading side of the primitives that differ between Pool and AsyncPool (see _acompat.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from time import monotonic
from typing import Any, TypeVar

__all__ = [
    "ASYNC",
    "Event",
    "Lock",
    "StateLock",
    "Waiter",
    "Worker",
    "current_owner",
    "ensure",
    "sleep",
    "spawn",
]

T = TypeVar("T")

ASYNC = False

sleep = time.sleep
Lock = threading.Lock
StateLock = threading.Lock


def current_owner() -> Any:
    """Threads are told apart by their ident (recorded separately): no task."""
    return None


def ensure(value: T) -> T:
    """Sync callbacks return their value directly."""
    return value


class Event:
    """threading.Event with the same interface as the async one."""

    __slots__ = ("_ev",)

    def __init__(self) -> None:
        self._ev = threading.Event()

    def set(self) -> None:
        self._ev.set()

    def clear(self) -> None:
        self._ev.clear()

    def is_set(self) -> bool:
        return self._ev.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._ev.wait(timeout)


class Waiter:
    """A borrower queued for a connection: resolved once, by a hand-off or an error.

    `set()`, `fail()` and `give_up()` are called with the pool's state lock held, so
    exactly one of them wins. The waiting thread blocks on a lock taken at creation.
    """

    __slots__ = ("_done", "_lock", "error", "item")

    def __init__(self) -> None:
        self.item: Any = None
        self.error: BaseException | None = None
        self._done = False
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self, item: Any) -> bool:
        """Hand `item` over; False if the waiter is already resolved (gone)."""
        if self._done:
            return False
        self._done = True
        self.item = item
        self._lock.release()
        return True

    def fail(self, error: BaseException) -> bool:
        if self._done:
            return False
        self._done = True
        self.error = error
        self._lock.release()
        return True

    def give_up(self) -> bool:
        """Stop waiting; False if a hand-off or an error arrived first."""
        if self._done:
            return False
        self._done = True
        return True

    def wait(self, deadline: float) -> bool:
        """Wait until resolved or `deadline` (monotonic).

        True: resolved by set() or fail() (they release the lock after writing the item
        or the error). False: the deadline came first, or maybe not; call give_up() with
        the pool's lock held to settle.
        """
        return self._lock.acquire(timeout=max(0.0, deadline - monotonic()))


class Worker:
    """A background activity of the pool: a daemon thread."""

    __slots__ = ("_thread",)

    def __init__(self, thread: threading.Thread) -> None:
        self._thread = thread

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


def spawn(fn: Callable[..., Any], *args: Any, name: str) -> Worker:
    """Run `fn(*args)` in the background (a daemon thread)."""
    thread = threading.Thread(target=fn, args=args, name=name, daemon=True)
    thread.start()
    return Worker(thread)
