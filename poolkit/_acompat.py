"""The asyncio side of the primitives that differ between AsyncPool and Pool (see _compat.py)."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Callable, Coroutine
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

# True in the async source, False in the generated sync code: for the few places where
# the two genuinely differ (a warning's class, say).
ASYNC = True

sleep = asyncio.sleep
Lock = asyncio.Lock
# Guards the pool's state. Never held across an await, so a plain threading lock is both
# correct (no task switch can happen under it) and the cheapest context manager there is.
StateLock = threading.Lock


def current_owner() -> Any:
    """The task that borrows: asyncio's current task."""
    return asyncio.current_task()


async def ensure(value: T | Awaitable[T]) -> T:
    """Await `value` if a callback returned an awaitable (user callbacks may be either)."""
    if inspect.isawaitable(value):
        return await value
    return value


class Event:
    """An event that a waiter can wait on with a timeout."""

    __slots__ = ("_ev",)

    def __init__(self) -> None:
        self._ev = asyncio.Event()

    def set(self) -> None:
        self._ev.set()

    def clear(self) -> None:
        self._ev.clear()

    def is_set(self) -> bool:
        return self._ev.is_set()

    async def wait(self, timeout: float | None = None) -> bool:
        if self._ev.is_set():
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._ev.wait()
        except TimeoutError:
            return False
        return True


class Waiter:
    """A borrower queued for a connection: resolved once, by a hand-off or an error.

    `set()`, `fail()` and `give_up()` are called with the pool's state lock held, so
    exactly one of them wins.
    """

    __slots__ = ("_done", "error", "fut", "item")

    def __init__(self) -> None:
        self.item: Any = None
        self.error: BaseException | None = None
        self._done = False
        self.fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def set(self, item: Any) -> bool:
        """Hand `item` over; False if the waiter is already resolved (gone)."""
        if self._done:
            return False
        self.item = item
        self._done = True
        self._wake()
        return True

    def fail(self, error: BaseException) -> bool:
        if self._done:
            return False
        self.error = error
        self._done = True
        self._wake()
        return True

    def give_up(self) -> bool:
        """Stop waiting; False if a hand-off or an error arrived first."""
        if self._done:
            return False
        self._done = True
        return True

    def _wake(self) -> None:
        loop = self.fut.get_loop()
        try:
            same = asyncio.get_running_loop() is loop
        except RuntimeError:
            same = False
        if same:
            if not self.fut.done():
                self.fut.set_result(None)
        else:
            # Resolved from another thread: wake the waiter through its own loop.
            loop.call_soon_threadsafe(_resolve, self.fut)

    async def wait(self, deadline: float) -> bool:
        """Wait until resolved or `deadline` (monotonic).

        True: resolved by set() or fail(), whose item or error is there to read. False:
        the deadline came first, or maybe not; call give_up() with the lock held to settle.
        """
        fut = self.fut
        if not fut.done():
            # A timer that resolves the future, not asyncio.timeout() (a cancel scope): a
            # third less per wait, and a timeout is settled by give_up() either way.
            timer = fut.get_loop().call_later(max(0.0, deadline - monotonic()), _resolve, fut)
            try:
                await fut
            finally:
                timer.cancel()
        return self.item is not None or self.error is not None


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Worker:
    """A background activity of the pool: an asyncio task."""

    __slots__ = ("_task",)

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self._task = task

    def is_alive(self) -> bool:
        return not self._task.done()

    async def join(self, timeout: float) -> None:
        if self._task.done() or self._task is asyncio.current_task():
            return
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._task)
        except TimeoutError:
            self._task.cancel()
        except BaseException:
            if not self._task.done():
                raise


_tasks: set[asyncio.Task[Any]] = set()


def spawn(fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any, name: str) -> Worker:
    """Run `fn(*args)` in the background (a task on the running loop)."""
    task = asyncio.get_running_loop().create_task(fn(*args), name=name)
    # The loop keeps only weak references to tasks.
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return Worker(task)
