"""psycopg internals that poolkit relies on (all in poolkit/_psycopg.py): fail loudly on change.

If a test here fails after a psycopg upgrade, poolkit/_psycopg.py needs updating before
anything else: the use-after-return guard, the "auto" reset or state restore would break.
"""

from __future__ import annotations

import inspect
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection, Connection
from psycopg._cursor_base import BaseCursor  # the one place a test reads psycopg privately

from poolkit import _psycopg

INTERNALS = "psycopg internals used by poolkit/_psycopg.py changed"


def test_snapshot_attributes_exist(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        for name in _psycopg._SNAPSHOT_ATTRS:
            assert name in conn.__dict__, f"{INTERNALS}: Connection.__dict__ has no {name!r}"
        assert hasattr(conn._prepared, "prepare_threshold"), INTERNALS
        snap = _psycopg.snapshot(conn)
        conn.read_only = True
        assert _psycopg.snapshot(conn) != snap, f"{INTERNALS}: read_only not in _read_only"
        conn.read_only = None
        conn.prepare_threshold = 2
        assert _psycopg.snapshot(conn) != snap, f"{INTERNALS}: prepare_threshold moved"


def test_pool_attribute_is_what_close_and_exit_read(dsn: str) -> None:
    for cls in (Connection, AsyncConnection):
        src = inspect.getsource(cls.close) + inspect.getsource(cls.__del__)
        assert '"_pool"' in src, f"{INTERNALS}: {cls.__name__}.close/__del__ no longer read _pool"


def test_forget_prepared_clears_psycopg_cache(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as conn:
        conn.execute("SELECT %s::int", [1])
        assert conn._prepared._names, f"{INTERNALS}: no prepared statement cached"
        for name in ("_counts", "_names", "_to_flush"):
            assert hasattr(conn._prepared, name), f"{INTERNALS}: _prepared.{name} gone"
        # Sent past psycopg, as the reset is (through conn.execute() psycopg would see the
        # tag and clear its cache itself).
        conn.pgconn.exec_(b"DISCARD ALL")
        _psycopg.forget_prepared(conn)
        # Nothing queued for the server (clear() would queue a DEALLOCATE ALL, sent after
        # the next statement was prepared again, dropping it).
        assert not conn._prepared._to_flush, f"{INTERNALS}: forget_prepared queued a command"
        for i in (2, 3):
            assert conn.execute("SELECT %s::int", [i]).fetchone() == (i,)


def test_threshold_of_reads_the_prepared_settings(dsn: str) -> None:
    with psycopg.connect(dsn, prepare_threshold=3) as conn:
        conn.prepared_max = 7
        got = _psycopg.THRESHOLD_OF(conn)
        assert got == (3, 7), f"{INTERNALS}: _prepared.prepare_threshold/prepared_max {got}"


def test_withhold_reaches_the_server_cursor_factory(dsn: str) -> None:
    # tracking_cursor(server=True) reads it from the keyword arguments of its __init__.
    with psycopg.connect(dsn) as conn:
        _psycopg.install_tracking(conn)
        key = _psycopg.state_key(conn)
        _psycopg.DIRTY.pop(key, None)
        conn.cursor("pk_no_hold").close()
        assert key not in _psycopg.DIRTY
        conn.cursor("pk_hold", withhold=True).close()
        bits = _psycopg.DIRTY.pop(key, 0)
        assert bits & _psycopg.HOLD_CURSOR_BIT, f"{INTERNALS}: withhold= not seen"


def test_check_results_sees_every_command_tag(dsn: str) -> None:
    assert "_check_results" in vars(BaseCursor), f"{INTERNALS}: BaseCursor._check_results gone"
    params = list(inspect.signature(BaseCursor._check_results).parameters)
    assert params == ["self", "results"], f"{INTERNALS}: _check_results signature {params}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        _psycopg.install_tracking(conn)
        _psycopg.DIRTY.pop(_psycopg.state_key(conn), None)
        conn.execute("SELECT 1")
        assert _psycopg.state_key(conn) not in _psycopg.DIRTY
        conn.execute("SET work_mem = '5MB'")
        assert _psycopg.DIRTY.pop(_psycopg.state_key(conn), 0), f"{INTERNALS}: SET not seen"
        with conn.pipeline():
            conn.execute("LISTEN pk_internals")
        key = _psycopg.state_key(conn)
        assert _psycopg.DIRTY.pop(key, 0), f"{INTERNALS}: pipelined LISTEN not seen"


def test_cursor_tag_and_results_are_readable(dsn: str) -> None:
    # poolkit_django's release="transaction" pins on session commands in any statement.
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute("SELECT 1; SET work_mem = '5MB'")
        assert _psycopg.RAW_TAG_OF(cur) == b"SELECT 1", f"{INTERNALS}: cursor._statusmessage"
        tags = [r.command_status for r in _psycopg.RESULTS_OF(cur)]
        assert tags == [b"SELECT 1", b"SET"], f"{INTERNALS}: cursor._results {tags}"
        assert cur.fetchone() == (1,)  # reading them moved nothing


def test_handler_lists_and_notification_backlog(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        saved = _psycopg.handlers(conn)
        conn.add_notice_handler(print)
        conn.add_notify_handler(print)
        assert _psycopg.handlers(conn) != saved, f"{INTERNALS}: handler lists moved"
        _psycopg.restore_handlers(conn, saved)
        assert _psycopg.handlers(conn) == saved == ([], [])
        conn.execute("LISTEN pk_internals_backlog")
        conn.execute("NOTIFY pk_internals_backlog")
        assert conn.__dict__.get("_notifies_backlog"), f"{INTERNALS}: no _notifies_backlog"
        _psycopg.forget_notifies(conn)
        assert list(conn.notifies(timeout=0.1)) == []


@pytest.mark.parametrize("name", _psycopg.GUARDED)
def test_guarded_methods_are_the_io_entry_points(name: str) -> None:
    for cls in (Connection, AsyncConnection):
        assert callable(getattr(cls, name, None)), f"{INTERNALS}: {cls.__name__}.{name} gone"


def test_every_io_method_goes_through_wait() -> None:
    # The guard shadows wait(): every method that talks to the server must call it.
    for cls in (Connection, AsyncConnection):
        for name in ("commit", "rollback", "set_autocommit", "set_read_only", "notifies"):
            src = inspect.getsource(getattr(cls, name))
            assert "self.wait(" in src, f"{INTERNALS}: {cls.__name__}.{name} bypasses wait()"


def test_close_now_closes(dsn: str) -> None:
    conn: Any = psycopg.connect(dsn)
    _psycopg.close_now(conn)
    assert conn.closed and not conn.broken


@pytest.mark.parametrize("cls", [Connection, AsyncConnection])
def test_all_connection_state_is_in_the_instance_dict(cls: type[Any]) -> None:
    # Each borrow lends a new handle sharing the pooled connection's instance dict: any
    # state kept in __slots__ would not be shared, and handles would drift apart.
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        assert slots in ((), []), f"{INTERNALS}: {klass.__qualname__} has __slots__ {slots}"


def test_a_handle_shares_the_connection(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        _psycopg.set_pool(conn, None)
        lent, returned = _psycopg.handle_classes(
            type(conn), lambda c: RuntimeError("refused"), lambda key, state: None
        )
        handle = _psycopg.new_handle(conn, lent)
        assert isinstance(handle, Connection) and handle is not conn
        assert handle.execute("SELECT pg_backend_pid()").fetchone() == (conn.info.backend_pid,)
        handle.autocommit = False
        assert conn.autocommit is False, f"{INTERNALS}: a handle's settings are its own"
        handle.rollback()
        assert _psycopg.state_key(handle) == _psycopg.state_key(conn)
        handle.__class__ = returned
        with pytest.raises(RuntimeError, match="refused"):
            handle.execute("SELECT 1")
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_tracked_adapters_are_what_the_connection_and_its_cursors_use(dsn: str) -> None:
    """install_adapters() writes `_adapters`, the attribute behind the read-only `adapters`
    property; cursors copy the connection's map; registrations go through the two register
    methods and types.add(), the three places the tracked map notes them."""
    with psycopg.connect(dsn) as conn:
        _psycopg.install_adapters(conn)
        tracked = conn.__dict__.get("_adapters")
        assert isinstance(tracked, _psycopg._TrackedAdapters), f"{INTERNALS}: no _adapters"
        assert conn.adapters is tracked, f"{INTERNALS}: adapters is not _adapters"
        key = _psycopg.state_key(conn)
        _psycopg.DIRTY.pop(key, None)
        conn.adapters.register_loader("text", psycopg.types.string.TextLoader)
        assert _psycopg.DIRTY.pop(key, 0) & _psycopg.ADAPTERS_BIT, INTERNALS
        psycopg.types.TypeInfo("pk_internals_t", 999_997, 0).register(conn)
        assert _psycopg.DIRTY.pop(key, 0) & _psycopg.ADAPTERS_BIT, INTERNALS
        with conn.cursor() as cur:
            assert cur.adapters.get_loader(25, psycopg.pq.Format.TEXT) is not None, INTERNALS
        _psycopg.restore_adapters(conn)
        assert conn.adapters is not tracked
        assert conn.adapters.types.get("pk_internals_t") is None, INTERNALS
        assert conn.execute("SELECT 'x'::text").fetchone() == ("x",)
