"""Test helpers whose async twin (tests/_tcompat_async.py) differs by nature."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

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
