"""Test helpers whose sync twin (tests/_tcompat.py) differs by nature; used by *_async tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import pytest_asyncio

ASYNC = True  # the async twin: one thread, no preemption between awaits
fixture = pytest_asyncio.fixture
sleep = asyncio.sleep


async def until(pred: Callable[[], Any], timeout: float = 10, what: str = "") -> Any:
    """Poll `pred` until it is truthy (never sleep-and-hope); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.01)


async def gather(*fns: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Run each function concurrently; return results (exceptions are returned, not raised)."""
    return list(await asyncio.gather(*(f() for f in fns), return_exceptions=True))


async def with_timeout(seconds: float, fn: Callable[[], Awaitable[Any]]) -> Any:
    """Run `fn()`; cancel it (TimeoutError) after `seconds`."""
    async with asyncio.timeout(seconds):
        return await fn()


T = TypeVar("T")


class Task(Generic[T]):
    """`fn()` running concurrently: an asyncio task here, a thread in the sync twin."""

    def __init__(self, fn: Callable[[], Awaitable[T]]) -> None:
        self._task = asyncio.ensure_future(fn())

    def done(self) -> bool:
        return self._task.done()

    async def join(self, timeout: float) -> T:
        """Wait up to `timeout` for the result (its exception is raised); TimeoutError after."""
        return await asyncio.wait_for(self._task, timeout)


def spawn(fn: Callable[[], Awaitable[T]]) -> Task[T]:
    """Start `fn()` concurrently; `join()` returns its result or raises its exception."""
    return Task(fn)


class Event:
    """An event whose `wait(timeout)` returns whether it was set, as threading's does."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._event.wait()
        except TimeoutError:
            return False
        return True


class Barrier:
    """`parties` workers wait for each other, so they go on at once."""

    def __init__(self, parties: int) -> None:
        self._barrier = asyncio.Barrier(parties)

    async def wait(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            await self._barrier.wait()


async def to_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking `fn(*args)` without blocking the loop; the sync twin just calls it."""
    return await asyncio.to_thread(fn, *args)
