"""Slot: poolkit's state for one pooled connection, kept beside it (nothing is patched on it)."""

from __future__ import annotations

import threading
import traceback
import weakref
from time import monotonic
from types import CodeType
from typing import Any

from . import _psycopg
from ._peek import Peeker


class _Gone:
    pass


# A weak reference that is already dead: `slot.wr()` is None unless a handle is parked.
NO_REF: weakref.ref[Any] = weakref.ref(_Gone())


class Slot:
    """One pooled connection and everything the pool knows about it.

    The slot holds the pool's own connection object (`conn`) for the connection's whole
    life; it is never lent. Each borrow gets a new handle on it (see
    `_psycopg.handle_classes`): another object of a subclass sharing its state, so a handle
    kept after its return is refused for good, even once the same server connection is
    lent again. The pool keeps no strong reference to a lent handle: a borrower that drops
    it unreturned lets it be collected, and the pool gets the slot back (`Pool._reclaim`).
    A parked handle is held weakly (`wr`), to be refused if the pool takes it back.
    """

    __slots__ = (
        "attrs",
        "checked",
        "cls",
        "code",
        "conn",
        "created_at",
        "deadline",
        "dirty",
        "expire_at",
        "guarded",
        "handlers",
        "last_good",
        "lasti",
        "owner",
        "parked",
        "peek",
        "pending",
        "returned_at",
        "returned_at_frame",
        "stack",
        "t0",
        "tag",
        "task",
        "threshold",
        "warned",
        "wr",
    )

    def __init__(self, conn: Any, created_at: float, expire_at: float) -> None:
        self.conn: Any = conn
        self.created_at = created_at
        self.expire_at = expire_at
        self.returned_at = created_at
        # When the connection last answered a round trip: a failure seen on another
        # connection invalidates only the connections older than this (see _lost()).
        self.last_good = created_at
        # Client-side settings to restore on return (see _psycopg.snapshot()).
        self.attrs, self.threshold = _psycopg.snapshot(conn)
        self.handlers = _psycopg.handlers(conn)  # notice/notify handlers, restored likewise
        # The connection's class while lent, and the one refusing any use while returned.
        self.cls: type[Any] = type(conn)
        self.guarded: type[Any] = self.cls
        self.dirty: bytes | None = None  # the reset this borrow made necessary
        self.pending: bytes | None = None  # a reset sent on return, answer not read yet
        self.peek = Peeker(conn)
        self.wr: weakref.ref[Any] = NO_REF  # the current borrow's handle (NO_REF: none)
        self.parked = False
        self.checked = False  # passed the user's check= callback at least once
        self.deadline = 0.0  # return-path I/O must end by then (0: none running)
        # The current borrow (valid while lent).
        self.t0 = 0.0
        self.code: CodeType | None = None
        # The borrowing frame's f_lasti (-1: the code's first line). The line number is
        # worked out only when reported: f_lineno scans the code's line table on every
        # borrow, a fifth of the cost of a borrow+return at module level.
        self.lasti = -1
        self.owner = 0
        self.task: Any = None
        self.tag: str | None = None
        self.warned = False
        self.stack: list[str] | None = None
        self.returned_at_frame: tuple[CodeType, int] | None = None  # (code, f_lasti)

    def disown(self) -> None:
        """Refuse the parked borrower's handle from now on: the pool takes it back."""
        handle = self.wr()
        # The class first, `parked` after: a putconn() of the parked handle running at the
        # same time reads them in the other order (see Pool._return), so it sees either
        # the slot still parked or its handle already refused.
        if handle is not None:
            handle.__class__ = self.guarded
        self.wr = NO_REF
        self.parked = False

    # -- reporting -------------------------------------------------------------------

    @property
    def site(self) -> str:
        """Where the current borrow started: file:line in function [tag]."""
        return _site(self.code, self.lasti, self.tag)

    @property
    def return_site(self) -> str:
        if self.returned_at_frame is None:
            return "the end of its connection() block"
        return _site(*self.returned_at_frame, None)

    @property
    def held_for(self) -> float:
        return monotonic() - self.t0

    def owner_name(self) -> str:
        if self.task is not None:
            name = getattr(self.task, "get_name", None)
            return f"task {name() if name else self.task!r}"
        for t in threading.enumerate():
            if t.ident == self.owner:
                return f"thread {t.name!r}"
        return f"thread {self.owner}"

    def current_stack(self) -> str:
        """Where the borrower is now: the stack that is holding the connection."""
        import sys

        if self.task is not None:
            try:
                frames = self.task.get_stack()
            except Exception:  # the task may be done or foreign
                return ""
            lines: list[str] = []
            for f in frames:
                lines.extend(traceback.format_stack(f, limit=1))
            return "".join(lines)
        frame = sys._current_frames().get(self.owner)
        return "".join(traceback.format_stack(frame)) if frame is not None else ""


def line_of(code: CodeType, lasti: int) -> int:
    """The source line of the instruction at byte offset `lasti` (-1: the first line)."""
    if lasti >= 0:
        for start, end, line in code.co_lines():
            if start <= lasti < end and line is not None:
                return line
    return code.co_firstlineno


def _site(code: CodeType | None, lasti: int, tag: str | None) -> str:
    if code is None:
        return f"<unknown> [{tag}]" if tag else "<unknown>"
    where = f"{code.co_filename}:{line_of(code, lasti)} in {code.co_name}"
    return f"{where} [{tag}]" if tag else where
