"""Test helpers whose async twin (tests/_tcompat_async.py) differs by nature."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import pytest

ASYNC = False  # the async twin: one thread, no preemption between awaits
fixture = pytest.fixture
sleep = time.sleep


def until(pred: Callable[[], Any], timeout: float = 10, what: str = "") -> Any:
    """Poll `pred` until it is truthy (never sleep-and-hope); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        time.sleep(0.01)


def gather(*fns: Callable[[], Any]) -> list[Any]:
    """Run each function in its own thread; return results (exceptions are returned)."""
    results: list[Any] = [None] * len(fns)

    def run(i: int, fn: Callable[[], Any]) -> None:
        try:
            results[i] = fn()
        except BaseException as ex:
            results[i] = ex

    threads = [threading.Thread(target=run, args=(i, f)) for i, f in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def with_timeout(seconds: float, fn: Callable[[], Any]) -> Any:
    """Threads cannot be cancelled: run `fn()` as is (its own timeouts bound it)."""
    return fn()


T = TypeVar("T")


class Task(Generic[T]):
    """`fn()` running concurrently: a thread here, an asyncio task in the async twin."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._outcome: list[T] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            self._outcome.append(fn())
        except BaseException as ex:  # handed to join(), as a task's exception is
            self._error = ex

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float) -> T:
        """Wait up to `timeout` for the result (its exception is raised); TimeoutError after."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"{self._thread.name} still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._outcome[0]


def spawn(fn: Callable[[], T]) -> Task[T]:
    """Start `fn()` concurrently; `join()` returns its result or raises its exception."""
    return Task(fn)


class Event:
    """An event whose `wait(timeout)` returns whether it was set, as threading's does."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)


class Barrier:
    """`parties` workers wait for each other, so they go on at once."""

    def __init__(self, parties: int) -> None:
        self._barrier = threading.Barrier(parties)

    def wait(self, timeout: float) -> None:
        self._barrier.wait(timeout)


def to_thread(fn: Callable[..., T], *args: Any) -> T:
    """Call `fn(*args)`: a sync test already runs on a thread of its own."""
    return fn(*args)
