"""asyncio primitives of AsyncClusterPool, named as their thread twins in _cluster_compat."""

from __future__ import annotations

import asyncio
import contextlib
import select
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["Event", "Lock", "Worker", "readable", "sleep", "spawn"]

sleep = asyncio.sleep
Lock = asyncio.Lock


class Event:
    """asyncio.Event whose wait() takes a timeout and says whether the event was set."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self, timeout: float | None = None) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)
        return self._event.is_set()


class Worker:
    """A background task; join() waits for it, then cancels it past the timeout."""

    __slots__ = ("_task",)

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self._task = task

    async def join(self, timeout: float) -> None:
        await asyncio.wait({self._task}, timeout=timeout)
        if not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=1.0)


def spawn(fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any, name: str) -> Worker:
    return Worker(asyncio.create_task(fn(*args), name=name))


def readable(fileno: int) -> bool:
    """True when the server sent something on an idle connection (a FATAL notice, EOF)."""
    try:
        return bool(select.select([fileno], [], [], 0)[0])
    except (OSError, ValueError):
        return True
