"""Connections lent to DatabaseWrappers: borrowed, parked between requests, given back,
and returned for a thread that ends without closing them."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import weakref
from contextvars import ContextVar
from types import FrameType
from typing import TYPE_CHECKING, Any

from poolkit import ClusterPool

from . import _registry
from ._registry import Entry, logger, open_entry
from ._sites import user_frame

if TYPE_CHECKING:
    from .base import DatabaseWrapper

_leak_logger = logging.getLogger("poolkit.leak")

# The view being served, set by PoolkitMiddleware: borrows are tagged with it so the pool
# keeps hold times per view.
current_tag: ContextVar[str | None] = ContextVar("poolkit_django_tag", default=None)


# -- lending -------------------------------------------------------------------------


def lend(wrapper: DatabaseWrapper, entry: Entry, frame: FrameType) -> Any:
    """Borrow a connection for `wrapper` and remember it, so a dying thread gives it back."""
    pool = open_entry(entry)
    # _borrow instead of getconn(): getconn() records its caller, Django's connect(),
    # as the borrow site; the leak tracker must name the application code instead.
    tag, site = current_tag.get() or _thread_tag(), user_frame(frame)
    if isinstance(pool, ClusterPool):
        conn = pool._borrow(None, False, False, tag, site)
    else:
        conn = pool._borrow(None, tag, site)
    wrapper._pk_lease = entry
    if not wrapper._pk_guarded:
        # Once per wrapper (wrappers live in one thread): the thread's guard watches it.
        guard = getattr(_local, "guard", None)
        if guard is None:
            guard = _local.guard = _ThreadGuard()
        guard.wrappers.add(wrapper)
        wrapper._pk_guarded = True
    return conn


def _thread_tag() -> str | None:
    """The tag "thread: NAME" for a borrow outside any view in a thread of its own, else None.

    A thread started by a view does not inherit the view's tag (threads start with an
    empty context), so its hold time is listed under the thread's name; the counter
    Python adds ("Thread-7 (send_mail)", "ThreadPoolExecutor-0_3") is dropped, so one
    kind of helper thread is one row. Worked out once per thread name: gunicorn's
    gthread workers run every request without a view tag in such a thread.
    """
    thread = threading.current_thread()
    name = thread.name
    cached: tuple[str, str | None] | None = getattr(_local, "tag", None)
    if cached is not None and cached[0] == name:
        return cached[1]
    if thread is threading.main_thread():
        tag = None
    else:
        target = re.fullmatch(r"Thread-\d+ \((.+)\)", name)
        tag = "thread: " + (target.group(1) if target else re.sub(r"-\d+(?:_\d+)?$", "", name))
    _local.tag = (name, tag)
    return tag


def give_back(wrapper: DatabaseWrapper, conn: Any) -> None:
    entry = wrapper._pk_lease
    assert entry is not None
    wrapper._pk_lease = None
    entry.pool.putconn(conn)


def park(wrapper: DatabaseWrapper, conn: Any) -> bool:
    """Keep `conn` reserved for `wrapper`'s thread until its next use (CONN_MAX_AGE).

    False, and nothing done, when the pool says it must go back with putconn() instead:
    someone waits for a connection, or the session must be reset first (the request that
    changed its session loses its place, nothing crosses).
    """
    entry = wrapper._pk_lease
    assert entry is not None
    return entry.parkable and entry.pool._park(conn)


def unpark(wrapper: DatabaseWrapper, conn: Any, frame: FrameType) -> bool:
    """Take a parked connection back into use; False if the pool took or closed it."""
    entry = wrapper._pk_lease
    if entry is None:
        return False
    try:
        tag = current_tag.get() or _thread_tag()
        back = bool(entry.pool._unpark(conn, tag, user_frame(frame)))
    except Exception:  # a closed or rebuilt pool: the connection is gone either way
        logger.debug("pool %r: unpark failed", entry.pool.name, exc_info=True)
        back = False
    if not back:
        wrapper._pk_lease = None
    return back


def release_parked(wrapper: DatabaseWrapper, conn: Any) -> None:
    """Give a parked connection back to the pool for good (close(), CONN_MAX_AGE passed)."""
    entry = wrapper._pk_lease
    wrapper._pk_lease = None
    if entry is not None and entry.pool._unpark(conn, None, None):
        entry.pool.putconn(conn)


_local = threading.local()
_guards: weakref.WeakSet[_ThreadGuard] = weakref.WeakSet()


class _ThreadGuard:
    """Lives in a thread-local, so it is freed when its thread ends: then it returns the
    connections that the thread's DatabaseWrappers still hold (Django closes connections
    at the end of a request, but nothing closes those of a helper thread)."""

    __slots__ = ("__weakref__", "pid", "thread", "wrappers")

    def __init__(self) -> None:
        self.wrappers: weakref.WeakSet[DatabaseWrapper] = weakref.WeakSet()
        self.thread = threading.current_thread().name
        self.pid = os.getpid()
        _guards.add(self)

    def __del__(self) -> None:
        # In a forked child the parent's threads are cleared too: their connections
        # belong to the parent and must not be touched here.
        if self.pid != os.getpid():
            return
        for wrapper in list(self.wrappers):
            _return_at_thread_exit(wrapper, self.thread)


def _return_at_thread_exit(wrapper: DatabaseWrapper, thread: str) -> None:
    try:
        entry, conn = wrapper._pk_lease, wrapper._pk_conn
        if entry is None or conn is None or wrapper.allow_thread_sharing:
            return  # a shared wrapper is closed by the thread it was shared with
        parked = wrapper._pk_parked
        wrapper.connection = None
        if parked:
            # Kept between requests (CONN_MAX_AGE): not a leak, just hand it back.
            release_parked(wrapper, conn)
            return
        wrapper._pk_lease = None
        entry.pool.putconn(conn)
        _leak_logger.info(
            "pool %r: thread %r ended without closing its Django connection (alias %r); "
            "the connection went back to the pool. Call django.db.connection.close() "
            "when a thread is done with the database.",
            entry.pool.name,
            thread,
            wrapper.alias,
        )
    except Exception:  # thread teardown: never raise
        logger.debug("could not return a connection at thread exit", exc_info=True)


def _after_fork_in_child() -> None:
    # poolkit has already pointed the parent's sockets at /dev/null; here the wrappers of
    # the forking thread forget them, so the child's first query borrows its own.
    for guard in list(_guards):
        for wrapper in list(guard.wrappers):
            if wrapper._pk_lease is not None:
                wrapper._pk_lease = None
                wrapper.connection = None
        guard.pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- a database cloned or dropped ---------------------------------------------------


def close_pools_for(dbname: str) -> None:
    """Close every connection this process holds to `dbname`, lent ones included.

    For the test runner, before it clones or drops a database: PostgreSQL refuses while
    any session uses it ("being accessed by other users").
    """
    victims = _registry.take_entries_for(dbname)
    me = threading.get_ident()
    for guard in list(_guards):
        for wrapper in list(guard.wrappers):
            entry = wrapper._pk_lease
            if entry is None or entry.params.get("dbname") != dbname:
                continue
            if wrapper._thread_ident == me:
                wrapper.close()
                continue
            logger.warning(
                "pool %r: closing a connection to %r still held by thread %r (alias %r) "
                "because the database is being cloned or dropped",
                entry.pool.name,
                dbname,
                guard.thread,
                wrapper.alias,
            )
            with contextlib.suppress(Exception):
                wrapper._pk_conn.close()
    for victim in victims:
        _registry.retire(victim)
