"""Fork safety: a child process forgets its parent's connections without touching them."""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger("poolkit")

_live: weakref.WeakSet[Any] = weakref.WeakSet()
# Connections inherited from the parent: kept referenced so that their finalizers never
# run in the child (they would send a Terminate on a socket the parent still uses).
_orphans: list[Any] = []


def track(pool: Any) -> None:
    _live.add(pool)


def orphan(conns: Iterable[Any]) -> None:
    """Point each inherited socket at /dev/null and keep the connection referenced."""
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


def _after_fork_in_child() -> None:
    for pool in list(_live):
        try:
            pool._after_fork()
        except Exception:  # never break the child's start
            logger.exception("pool %r: could not reset after fork", getattr(pool, "name", "?"))


os.register_at_fork(after_in_child=_after_fork_in_child)
