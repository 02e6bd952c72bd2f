"""Test helpers whose sync twin (tests/_tcompat.py) differs by nature; used by *_async tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest_asyncio

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
