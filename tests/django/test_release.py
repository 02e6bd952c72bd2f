"""OPTIONS["pool"]["release"] = "transaction": back to the pool between statements, pins kept."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from django.core.checks import run_checks
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, OperationalError, connections, transaction

from poolkit import PoolTimeout
from poolkit_django import pools
from tests.django._support import (
    call_json,
    call_wsgi,
    extra_database,
    gunicorn,
    run_manage,
    scratch_database,
)

TX_POOL = {"min_size": 1, "max_size": 1, "timeout": 5, "release": "transaction"}


def _tx_alias(blocker: Any, admin_dsn: str, dsn: str, pool: dict[str, Any]) -> Iterator[Any]:
    with (
        blocker.unblock(),
        scratch_database(admin_dsn, dsn) as url,
        extra_database("tx", url, pool=pool),
    ):
        yield connections["tx"]


@pytest.fixture
def tx(django_db_blocker: Any, admin_dsn: str, dsn: str) -> Iterator[Any]:
    """Alias "tx" on a scratch database, release="transaction", one connection."""
    yield from _tx_alias(django_db_blocker, admin_dsn, dsn, TX_POOL)


@pytest.fixture
def tx_short(django_db_blocker: Any, admin_dsn: str, dsn: str) -> Iterator[Any]:
    """As `tx`, with a short borrow timeout for tests that run into it."""
    yield from _tx_alias(django_db_blocker, admin_dsn, dsn, {**TX_POOL, "timeout": 0.3})


def in_use() -> int:
    return int(pools()["tx"].stats()["in_use"])


def run(wrapper: Any, sql: str) -> Any:
    with wrapper.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone() if cur.description else None


def test_each_statement_gives_the_connection_back(tx: Any) -> None:
    assert run(tx, "SELECT 1") == (1,)
    assert tx._pk_conn is None  # back with the pool between statements...
    assert in_use() == 0  # ...and the pool has it back
    assert run(tx, "SELECT 2") == (2,)
    assert in_use() == 0
    # A cursor still open keeps it: results stay readable until the last one closes.
    first, second = tx.cursor(), tx.cursor()
    first.execute("SELECT 3")
    second.execute("SELECT 4")
    first.close()
    assert in_use() == 1
    assert second.fetchone() == (4,)
    second.close()
    assert in_use() == 0


def test_atomic_keeps_the_connection_to_its_end(tx: Any) -> None:
    run(tx, "CREATE TABLE t (x int)")
    with transaction.atomic(using="tx"):
        run(tx, "INSERT INTO t VALUES (1)")
        assert in_use() == 1
        with transaction.atomic(using="tx"):  # a savepoint
            run(tx, "INSERT INTO t VALUES (2)")
        assert in_use() == 1
        backend = run(tx, "SELECT pg_backend_pid()")
        assert run(tx, "SELECT pg_backend_pid()") == backend
    assert in_use() == 0
    assert run(tx, "SELECT count(*) FROM t") == (2,)
    with pytest.raises(ValueError), transaction.atomic(using="tx"):
        run(tx, "INSERT INTO t VALUES (3)")
        raise ValueError
    assert in_use() == 0
    assert run(tx, "SELECT count(*) FROM t") == (2,)


@pytest.mark.parametrize(
    "pin",
    [
        "SET statement_timeout = '4321ms'",
        "SELECT set_config('statement_timeout', '4321ms', false)",
        "CREATE TEMP TABLE scratch (x int)",
        "SELECT pg_advisory_lock(42)",
        "LISTEN somewhere",
        "BEGIN",
        "PREPARE p AS SELECT 1",
        # A statement after the first in one string: its tag is not the cursor's
        # statusmessage (that of the first result).
        "SELECT 1; SET statement_timeout = '4321ms'",
        "SELECT 1; SET statement_timeout = '4321ms'; SELECT 2",
        "SELECT 1; PREPARE p AS SELECT 1",
    ],
)
def test_session_state_pins_the_connection_until_the_request_ends(tx: Any, pin: str) -> None:
    backend = run(tx, "SELECT pg_backend_pid()")
    run(tx, pin)
    assert in_use() == 1
    assert run(tx, "SELECT pg_backend_pid()") == backend  # still the same session
    if "statement_timeout" in pin:
        assert run(tx, "SHOW statement_timeout") == ("4321ms",)
    # Request end (Django's request_finished): the connection goes back, reset.
    tx.close_if_unusable_or_obsolete()
    assert in_use() == 0
    assert tx.connection is None
    # Nothing crosses to the next borrower, not even what no command tag shows.
    assert run(tx, "SHOW statement_timeout") == ("0",)
    assert run(tx, "SELECT to_regclass('pg_temp.scratch')") == (None,)
    assert run(tx, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == (0,)
    assert run(tx, "SELECT count(*) FROM pg_prepared_statements WHERE name = 'p'") == (0,)
    assert in_use() == 0  # not pinned any more


def test_a_set_run_by_executemany_pins_the_connection(tx: Any) -> None:
    # executemany() keeps no results, only the last statement's command tag.
    with tx.cursor() as cur:
        cur.executemany("SET statement_timeout = '4321ms'", [(), ()])
    assert in_use() == 1
    assert run(tx, "SHOW statement_timeout") == ("4321ms",)


def test_a_server_side_cursor_pins_the_connection(tx: Any) -> None:
    with tx.chunked_cursor() as cur:
        cur.execute("SELECT generate_series(1, 3)")
        assert cur.fetchmany(2) == [(1,), (2,)]
    assert in_use() == 1
    tx.close_if_unusable_or_obsolete()
    assert in_use() == 0


def test_two_threads_share_one_connection_between_statements(tx: Any) -> None:
    """max_size=1: a request waiting on something else holds no connection, so another
    request runs meanwhile (per-request borrowing would make it wait or time out)."""

    def request(_: int) -> list[int]:
        out = call_json("/wait_between", db="tx", s=0.3)
        return list(out["backends"])

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(request, range(4)))
    assert len({b for pair in results for b in pair}) == 1  # one connection, shared
    stats = pools()["tx"].stats()
    assert stats["in_use"] == 0
    assert stats["timeouts"] == 0
    assert stats["size"] == 1


def test_a_timeout_borrowing_again_is_djangos_operational_error(tx_short: Any) -> None:
    """The statement after a release borrows again; a timeout there is reported as one at
    the first borrow: django.db.OperationalError with the PoolTimeout as its cause, so
    `except DatabaseError` catches it and PoolkitMiddleware still answers 503."""
    run(tx_short, "SELECT 1")
    pool = pools()["tx"]
    assert tx_short._pk_between is not None  # the next statement borrows again
    taken = pool.getconn()  # as by another request
    try:
        with pytest.raises(DatabaseError) as again:
            run(tx_short, "SELECT 2")
        tx_short.close()  # forget the released connection: the next one is a first borrow
        with pytest.raises(DatabaseError) as first:
            run(tx_short, "SELECT 3")
    finally:
        pool.putconn(taken)
    for err in (again.value, first.value):
        assert type(err) is OperationalError
        assert isinstance(err.__cause__, PoolTimeout)
        assert str(err) == str(err.__cause__)
    assert run(tx_short, "SELECT 4") == (4,)  # nothing left broken
    status, headers, body = call_wsgi("/busy_between", db="tx")
    assert (status, headers["Retry-After"]) == (503, "1"), body
    assert in_use() == 0


def test_release_setting_is_validated(dsn: str) -> None:
    with (
        extra_database("bad", dsn, pool={"release": "statement"}),
        pytest.raises(ImproperlyConfigured, match=r"\['release'\]='statement'"),
    ):
        connections["bad"].pool  # noqa: B018


def test_conn_max_age_with_transaction_release_warns(dsn: str) -> None:
    with extra_database("both", dsn, pool=TX_POOL, conn_max_age=600):
        (warning,) = [m for m in run_checks() if m.id == "poolkit_django.W001"]
    assert "has no effect with OPTIONS['pool']['release']='transaction'" in warning.msg


@pytest.mark.slow
def test_gthread_server_serves_more_waiting_requests_than_connections(
    pg_server: Any, tmp_path: Path
) -> None:
    """A real gunicorn (gthread, 8 threads, pool of 2, timeout 1 s): 16 requests that each
    wait 0.3 s between two queries. Per request they would need 16 x 0.3 s / 2 = 2.4 s
    of connection time and time out; released per transaction they all succeed."""
    with scratch_database(pg_server.admin_dsn, pg_server.dsn, prefix="pk_djtx") as url:
        run_manage(url, "migrate", "-v0")
        pool = {"min_size": 2, "max_size": 2, "timeout": 1, "release": "transaction"}
        server = gunicorn(
            url, tmp_path / "tx.log", worker_class="gthread", threads=8, PK_POOL=json.dumps(pool)
        )
        with server, ThreadPoolExecutor(16) as ex:
            statuses = list(ex.map(lambda _: server.get("/wait_between?s=0.3")[0], range(16)))
            stats = server.json("/stats")["default"]
    assert statuses == [200] * 16, server.logs()
    assert stats["timeouts"] == 0
    assert stats["in_use"] == 0
    assert stats["size"] == 2


def test_a_connection_created_receiver_that_queries_does_not_release(tx: Any) -> None:
    """django.contrib.postgres-style receivers query the new connection; the statement that
    made the borrow must still get a connection."""
    from django.db.backends.signals import connection_created

    seen: list[Any] = []

    def receiver(sender: Any, connection: Any, **kwargs: Any) -> None:
        if connection.alias == "tx":
            with connection.cursor() as cur:
                cur.execute("SELECT 1")
            seen.append(connection.alias)

    connection_created.connect(receiver)
    try:
        assert run(tx, "SELECT 2") == (2,)  # the full connect()
        assert run(tx, "SELECT 3") == (3,)  # the re-borrow
    finally:
        connection_created.disconnect(receiver)
    assert seen == ["tx", "tx"]
    assert in_use() == 0
