"""Borrow sites and leak reports: who holds a connection, where it was borrowed, for how long."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from time import monotonic
from types import CodeType, FrameType
from typing import Any

from ._slot import Slot

logger = logging.getLogger("poolkit")
leak_logger = logging.getLogger("poolkit.leak")

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

Site = FrameType | CodeType | None

FRAMEWORK_FILES: dict[str, bool] = {}


def is_framework(filename: str) -> bool:
    """True for poolkit's, the frameworks' and the stdlib's files (cached: called per borrow)."""
    known = FRAMEWORK_FILES.get(filename)
    if known is None:
        if len(FRAMEWORK_FILES) > 10_000:
            FRAMEWORK_FILES.clear()
        known = FRAMEWORK_FILES[filename] = filename.startswith(SKIP_PREFIXES)
    return known


def user_frame(f: FrameType) -> FrameType:
    """The first frame, from f outwards, outside poolkit, the frameworks and the stdlib."""
    for _ in range(12):
        if not is_framework(f.f_code.co_filename) or f.f_back is None:
            return f
        f = f.f_back
    return f


@dataclass(frozen=True)
class BorrowInfo:
    """A public view of one current borrow (for dashboards and the doctor)."""

    held_for: float
    site: str
    owner: str
    tag: str | None
    leak_suspect: bool


def borrow_infos(slots: Iterable[Slot], threshold: float) -> list[BorrowInfo]:
    now = monotonic()
    out = [
        BorrowInfo(
            held_for=now - s.t0,
            site=s.site,
            owner=s.owner_name(),
            tag=s.tag,
            leak_suspect=bool(threshold) and now - s.t0 >= threshold,
        )
        for s in slots
    ]
    out.sort(key=lambda b: -b.held_for)
    return out


def warn_leak(name: str, slot: Slot, now: float, threshold: float) -> None:
    borrow_stack = "\nStack at borrow:\n" + "".join(slot.stack) if slot.stack else ""
    leak_logger.warning(
        "pool %r: connection borrowed at %s by %s has been out for %.1f s "
        "(leak_threshold=%s s). Current stack of the borrower:\n%s%s",
        name,
        slot.site,
        slot.owner_name(),
        now - slot.t0,
        threshold,
        slot.current_stack() or "  <not available>\n",
        borrow_stack,
    )


def note_late_return(name: str, slot: Slot, held: float) -> None:
    leak_logger.info(
        "pool %r: connection borrowed at %s by %s came back after %.1f s",
        name,
        slot.site,
        slot.owner_name(),
        held,
    )


def warn_reclaimed(name: str, slot: Slot) -> None:
    leak_logger.warning(
        "pool %r: a connection borrowed at %s by %s was garbage-collected without "
        "being returned after %.1f s; its slot is given back to the pool. Return "
        "connections with 'with pool.connection()' or putconn().",
        name,
        slot.site,
        slot.owner_name(),
        monotonic() - slot.t0,
    )


def describe_owner(task: Any) -> str:
    if task is not None:
        get_name = getattr(task, "get_name", None)
        return f"task {get_name() if get_name else task!r}"
    return f"thread {threading.current_thread().name!r}"
