"""CONN_MAX_AGE under the pool: a thread keeps (parks) its connection between requests."""

from __future__ import annotations

import json
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.core.checks import run_checks
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from poolkit_django import get_pool, pools
from tests.django._support import (
    call_json,
    call_wsgi,
    extra_database,
    gunicorn,
    run_manage,
    scratch_database,
)


@pytest.fixture
def scratch(django_db_blocker: Any, admin_dsn: str, dsn: str) -> Iterator[str]:
    with django_db_blocker.unblock(), scratch_database(admin_dsn, dsn) as url:
        yield url


def parked(alias: str) -> int:
    s = pools()[alias].stats()
    return int(s["size"] - s["idle"] - s["in_use"])


def test_a_thread_keeps_its_backend_across_requests(scratch: str) -> None:
    pool = {"min_size": 2, "max_size": 2, "timeout": 5}
    with extra_database("aged", scratch, pool=pool, conn_max_age=600):
        assert [m for m in run_checks() if m.id.startswith("poolkit_django")] == []
        first = call_json("/pid", db="aged")["backend"]
        wrapper = connections["aged"]
        raw = wrapper._pk_conn
        assert wrapper._pk_parked
        stats = pools()["aged"].stats()
        assert stats["in_use"] == 0  # parked is not lent: the pool may take it back
        assert parked("aged") == 1
        for _ in range(3):
            assert call_json("/pid", db="aged")["backend"] == first
        assert wrapper.connection is raw  # reading it takes it back: the same connection
        wrapper.close()
        assert pools()["aged"].stats()["in_use"] == 0
        assert parked("aged") == 0


def test_session_state_does_not_cross_parked_requests(scratch: str) -> None:
    with extra_database("aged", scratch, conn_max_age=None):
        default = call_json("/session/show", db="aged")
        backend = call_json("/session/set", db="aged")["backend"]
        after = call_json("/session/show", db="aged")
        connections["aged"].close()
    assert after["backend"] == backend  # the same session...
    assert after == default  # ...with nothing left from the request that changed it


def test_conn_max_age_zero_returns_at_request_end(scratch: str) -> None:
    with extra_database("plain", scratch, conn_max_age=0):
        call_json("/pid", db="plain")
        assert connections["plain"]._pk_conn is None
        assert parked("plain") == 0


def test_conn_max_age_elapsed_gives_the_connection_back(scratch: str) -> None:
    with extra_database("short", scratch, conn_max_age=1):
        call_json("/pid", db="short")
        wrapper = connections["short"]
        assert wrapper._pk_parked
        wrapper.close_at = time.monotonic() - 1  # as if a second had passed
        wrapper.close_if_unusable_or_obsolete()  # the next request_started
        assert wrapper._pk_conn is None
        assert parked("short") == 0


def test_three_threads_two_connections_no_deadlock(scratch: str) -> None:
    """max_size=2, three threads: the third takes a parked connection instead of waiting
    for the whole pool timeout; each thread's session starts clean."""
    pool = {"min_size": 2, "max_size": 2, "timeout": 3}
    errors: list[BaseException] = []
    seen: dict[str, list[dict[str, Any]]] = {}

    def user(name: str) -> None:
        try:
            out = seen.setdefault(name, [])
            out.append(call_json("/session/set", db="aged"))
            out.append(call_json("/session/show", db="aged"))
            out.append(call_json("/session/show", db="aged"))
            connections["aged"].close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    with extra_database("aged", scratch, pool=pool, conn_max_age=600):
        get_pool("aged").wait()  # both connections open: a and b need not steal
        # a and b park their connection (the threads stay alive until c is done).
        hold = threading.Event()

        def parked_user(name: str) -> None:
            call_json("/pid", db="aged")
            hold.wait(20)
            connections["aged"].close()

        a = threading.Thread(target=parked_user, args=("a",))
        b = threading.Thread(target=parked_user, args=("b",))
        a.start()
        b.start()
        deadline = time.monotonic() + 10
        while parked("aged") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert parked("aged") == 2
        t0 = time.monotonic()
        c = threading.Thread(target=user, args=("c",))
        c.start()
        c.join(20)
        took = time.monotonic() - t0
        hold.set()
        a.join(20)
        b.join(20)
        stats = pools()["aged"].stats()
    assert not errors, errors
    assert took < 3  # not the pool timeout: it took a parked connection
    assert stats["timeouts"] == 0
    assert stats["in_use"] == 0
    assert stats["size"] == 2
    for show in seen["c"][1:]:
        assert show["statement_timeout"] == "0"


@pytest.mark.slow
def test_gthread_server_keeps_one_connection_per_thread(pg_server: Any, tmp_path: Path) -> None:
    """gunicorn gthread, 4 threads, pool of 2, CONN_MAX_AGE=600: concurrent requests that
    SET session state and read it back never see another request's settings, nothing
    times out, and with the load gone each thread keeps one backend."""
    with scratch_database(pg_server.admin_dsn, pg_server.dsn, prefix="pk_djage") as url:
        run_manage(url, "migrate", "-v0")
        pool = {"min_size": 2, "max_size": 2, "timeout": 10}
        server = gunicorn(
            url, tmp_path / "aged.log", worker_class="gthread", threads=4,
            PK_POOL=json.dumps(pool), PK_CONN_MAX_AGE="600",
        )  # fmt: skip
        with server, ThreadPoolExecutor(8) as ex:
            paths = ["/session/set", "/session/show"] * 60
            answers = list(ex.map(lambda p: (p, server.get(p)), paths))
            one_at_a_time = [server.json("/pid")["backend"] for _ in range(10)]
            stats = server.json("/stats")["default"]
    assert all(r[0] == 200 for _, r in answers), server.logs()
    for path, (_, _, body) in answers:
        if path == "/session/show":
            shown = json.loads(body)
            assert shown["statement_timeout"] == "0", shown
            assert shown["TimeZone"] == "UTC", shown
    assert stats["timeouts"] == 0
    assert stats["size"] <= 2
    assert len(set(one_at_a_time)) <= 2


@pytest.mark.parametrize("max_age", [600, None])
def test_djangos_own_pool_switch_keeps_its_rule(scratch: str, max_age: int | None) -> None:
    # `"pool": True` is Django's switch, which Django refuses with persistent connections;
    # the same settings under poolkit_django fail the same way, and say how to park.
    with extra_database("aged", scratch, conn_max_age=max_age) as db:
        db["OPTIONS"]["pool"] = True
        with pytest.raises(ImproperlyConfigured) as info:
            _ = connections["aged"].pool
        msg = str(info.value)
        assert msg.startswith("Pooling doesn't support persistent connections.")
        assert "drop OPTIONS['pool'] or give it as a dict" in msg and "'aged'" in msg
        db["OPTIONS"].pop("pool")  # the engine's default form parks instead
        assert connections["aged"].pool is not None
        assert call_json("/pid", db="aged")["backend"]
        assert connections["aged"]._pk_parked


@pytest.mark.parametrize("engine", ["native", "poolkit"])
def test_health_check_runs_after_a_request_that_had_an_error(
    scratch: str, admin_dsn: str, engine: str
) -> None:
    """CONN_HEALTH_CHECKS: a request whose query failed (errors_occurred) ends with Django's
    is_usable() check; the next request's first query is checked again, as Django does for
    every request on a persistent connection. A parked connection whose server session
    ended in between is replaced, not used: the request succeeds. ("native": Django's own
    backend without a pool, the behaviour to match.)"""
    options: dict[str, Any] = {"pool": False} if engine == "native" else {}
    with extra_database(
        "aged", scratch, engine=engine, conn_max_age=600, CONN_HEALTH_CHECKS=True, **options
    ):
        before = call_json("/pid", db="aged")["backend"]
        assert call_json("/db_error", db="aged") == {"error": "ProgrammingError"}
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [before])
        status, _, body = call_wsgi("/pid", db="aged")
        assert status == 200, body[:2000]
        assert json.loads(body)["backend"] != before
        if engine == "poolkit":
            s = pools()["aged"].stats()
            assert s["size"] == s["idle"] + s["in_use"] + s["parked"]


@pytest.mark.parametrize("max_age", [600, 0])
def test_a_server_side_cursor_left_open_does_not_reach_another_thread(
    scratch: str, max_age: int
) -> None:
    """A server-side cursor (QuerySet.iterator(), chunked_cursor()) made in autocommit is
    declared WITH HOLD and outlives the request in the session when it is not closed.
    Django's own backend keeps it in the thread's session (CONN_MAX_AGE) or closes the
    session (CONN_MAX_AGE=0); under the pool the next request of another thread gets that
    session, so the cursor must be closed before it gets there."""
    pool = {"min_size": 1, "max_size": 1, "timeout": 5}
    with extra_database("aged", scratch, pool=pool, conn_max_age=max_age):
        with warnings.catch_warnings():
            # psycopg: "deleted while still open", the point of the view.
            warnings.simplefilter("ignore", ResourceWarning)
            assert call_json("/cursor/left_open", db="aged") == {"first": 1}
        seen: list[Any] = []

        def other_thread() -> None:
            try:
                seen.append(call_json("/cursors", db="aged"))
            except BaseException as exc:  # reported below
                seen.append(exc)
            finally:
                connections["aged"].close()

        t = threading.Thread(target=other_thread)
        t.start()
        t.join(20)
        assert seen == [{"cursors": []}]
        assert call_json("/cursors", db="aged") == {"cursors": []}  # nor in this thread
        connections["aged"].close()
        s = pools()["aged"].stats()
        assert s["size"] == s["idle"] == 1
        assert s["in_use"] == s["parked"] == 0


def test_adapters_registered_when_django_connects_keep_the_connection_parked(
    scratch: str,
) -> None:
    """Receivers of connection_created register types on the connection (as
    django.contrib.postgres does for hstore and citext): that is the connection's setup, not
    a request's leftover, so the connection parks and keeps them; a loader a view registers
    is dropped at request end."""
    from django.db.backends.signals import connection_created

    def register(sender: Any, connection: Any, **kwargs: Any) -> None:
        if connection.alias == "aged":
            connection.connection.adapters.register_loader("int4", psycopg.types.string.TextLoader)

    connection_created.connect(register, dispatch_uid="pk_test_register")
    try:
        with extra_database("aged", scratch, conn_max_age=600):
            first = call_json("/pid", db="aged")["backend"]
            wrapper = connections["aged"]
            assert wrapper._pk_parked
            with wrapper.cursor() as cur:  # unparks: the same session, the loader kept
                cur.execute("SELECT pg_backend_pid(), 1::int4, 'a'::text")
                assert cur.fetchone() == (str(first), "1", "a")
                wrapper.connection.adapters.register_loader("text", _UpperLoader)
            wrapper.close_if_unusable_or_obsolete()  # request end: returned, loader dropped
            assert not wrapper._pk_parked
            with wrapper.cursor() as cur:  # Django connects again (and registers again)
                cur.execute("SELECT 1::int4, 'a'::text")
                assert cur.fetchone() == ("1", "a")
            wrapper.close_if_unusable_or_obsolete()
            assert wrapper._pk_parked
    finally:
        connection_created.disconnect(dispatch_uid="pk_test_register")


class _UpperLoader(psycopg.adapt.Loader):
    def load(self, data: Any) -> str:
        return bytes(data).decode().upper()
