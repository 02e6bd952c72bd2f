"""Thread primitives of ClusterPool, named as their asyncio twins in _cluster_acompat."""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Event", "Lock", "Worker", "readable", "sleep", "spawn"]

sleep = time.sleep
Lock = threading.Lock
Event = threading.Event


class Worker:
    """A daemon thread; join() waits for it at most `timeout` seconds."""

    __slots__ = ("_thread",)

    def __init__(self, thread: threading.Thread) -> None:
        self._thread = thread

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def spawn(fn: Callable[..., Any], *args: Any, name: str) -> Worker:
    thread = threading.Thread(target=fn, args=args, name=name, daemon=True)
    thread.start()
    return Worker(thread)


def readable(fileno: int) -> bool:
    """True when the server sent something on an idle connection (a FATAL notice, EOF)."""
    try:
        return bool(select.select([fileno], [], [], 0)[0])
    except (OSError, ValueError):
        return True
