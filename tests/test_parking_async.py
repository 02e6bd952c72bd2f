"""Parking (the core of Django's CONN_MAX_AGE): reserved, stolen, expired, never doubly lent."""

from __future__ import annotations

import linecache
import logging
import os
import random
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from poolkit import AsyncPool, ConnectionReturned, PoolTimeout
from poolkit import _returns_async as returns  # sync: from poolkit import _returns as returns
from tests._helpers import terminate_backends
from tests._tcompat_async import ASYNC, fixture, gather, sleep, spawn, until

pytestmark = pytest.mark.asyncio  # async-only
MakePool = Callable[..., Awaitable[AsyncPool[Any]]]  # async-only
# sync: MakePool = Callable[..., Pool[Any]]


@fixture
async def make_pool(app_dsn: str) -> AsyncIterator[MakePool]:
    pools: list[AsyncPool[Any]] = []

    async def make(housekeeping: float = 0.05, **kw: Any) -> AsyncPool[Any]:
        kw.setdefault("min_size", 1)
        pool: AsyncPool[Any] = AsyncPool(app_dsn, open=False, **kw)
        pool.housekeeping_interval = housekeeping
        pools.append(pool)
        await pool.open(wait=True, timeout=30)
        return pool

    yield make
    for pool in pools:
        await pool.close(timeout=0)


def counts(pool: AsyncPool[Any]) -> tuple[int, int, int]:
    s = pool.stats()
    return s["size"], s["idle"], s["in_use"]


async def test_a_parked_connection_is_neither_idle_nor_in_use(make_pool: MakePool) -> None:
    pool = await make_pool(min_size=2, max_size=2)
    conn = await pool.getconn()
    borrows = pool.stats()["borrows"]
    assert pool._park(conn)
    assert counts(pool) == (2, 1, 0)
    assert pool.borrowed() == []  # nor listed as borrowed, nor a leak suspect
    assert pool._unpark(conn)
    assert counts(pool) == (2, 1, 1)
    assert [os.path.basename(__file__) in b.site for b in pool.borrowed()] == [True]
    assert pool.stats()["borrows"] == borrows + 1  # an unpark is a borrow, counted exactly
    await conn.execute("SELECT 1")
    await pool.putconn(conn)
    assert counts(pool) == (2, 2, 0)


async def test_a_borrower_at_max_size_takes_a_parked_connection(make_pool: MakePool) -> None:
    pool = await make_pool(min_size=1, max_size=1)
    conn = await pool.getconn()
    pid = conn.info.backend_pid
    assert pool._park(conn)
    other = await pool.getconn(timeout=5)
    assert other is not conn and other.info.backend_pid == pid
    assert counts(pool) == (1, 0, 1)
    assert not pool._unpark(conn)  # its parker no longer has it
    with pytest.raises(ConnectionReturned):
        await conn.execute("SELECT 1")
    await pool.putconn(other)
    assert counts(pool) == (1, 1, 0)


async def test_a_parked_connection_given_back_is_not_taken_again(make_pool: MakePool) -> None:
    pool = await make_pool(min_size=1, max_size=1)
    conn = await pool.getconn()
    assert pool._park(conn)
    await pool.putconn(conn)  # given back while parked (no _unpark first)
    assert counts(pool) == (1, 1, 0)
    assert not pool._unpark(conn)
    first = await pool.getconn(timeout=5)
    # Had the pool still listed it as parked, this borrow would take the same connection
    # a second time; it must wait instead.
    with pytest.raises(PoolTimeout):
        await pool.getconn(timeout=0.3)
    await pool.putconn(first)
    assert counts(pool) == (1, 1, 0)


async def test_a_parked_connection_obeys_max_idle(make_pool: MakePool) -> None:
    pool = await make_pool(min_size=1, max_size=2, max_idle=0.3)
    conn = await pool.getconn()
    pid = conn.info.backend_pid
    assert pool._park(conn)
    await until(lambda: conn.closed, timeout=10, what="the parked connection closed")
    assert not pool._unpark(conn)
    with pytest.raises(ConnectionReturned):
        await conn.execute("SELECT 1")
    await until(lambda: counts(pool) == (1, 1, 0), timeout=10, what="refilled to min_size")
    async with pool.connection() as again:
        assert again.info.backend_pid != pid


async def test_a_parked_connection_older_than_a_lost_one_is_closed(
    make_pool: MakePool, admin_conn: Any
) -> None:
    # As idle ones are: a connection found broken invalidates those opened before it last
    # worked, parked ones included (the parker's next request borrows a fresh one).
    pool = await make_pool(min_size=2, max_size=2)
    parked = await pool.getconn()
    async with pool.connection() as other:  # returned once: its last success is now
        pass
    other = await pool.getconn()
    assert pool._park(parked)
    admin_conn.execute("SELECT pg_terminate_backend(%s)", [other.info.backend_pid])
    with pytest.raises(psycopg.OperationalError):
        await other.execute("SELECT 1")
    await pool.putconn(other)
    await until(lambda: parked.closed, timeout=10, what="the parked connection closed")
    assert not pool._unpark(parked)
    await until(lambda: counts(pool) == (2, 2, 0), timeout=10, what="refilled")


async def test_a_parked_connection_found_broken_takes_the_older_parked_ones_with_it(
    make_pool: MakePool, admin_dsn: str, app_name: str
) -> None:
    # A parked connection last worked when it was parked: found broken (a restart killed
    # every backend), it invalidates the others parked before, so each thread after the
    # first borrows a fresh connection instead of failing one request of its own.
    pool = await make_pool(housekeeping=60, min_size=3, max_size=3)  # unpark must see it
    conns = [await pool.getconn() for _ in range(3)]
    oldest = min(conns, key=lambda c: pool._lent[id(c)].created_at)
    for conn in conns:
        assert pool._park(conn)
    assert pool.stats()["parked"] == 3 and counts(pool) == (3, 0, 0)
    terminate_backends(admin_dsn, application_name=app_name)
    assert pool._unpark(oldest)
    with pytest.raises(psycopg.OperationalError):
        await oldest.execute("SELECT 1")
    await pool.putconn(oldest)
    for conn in conns:
        if conn is not oldest:
            assert not pool._unpark(conn)
            with pytest.raises(ConnectionReturned):
                await conn.execute("SELECT 1")
    assert pool.stats()["parked"] == 0
    async with pool.connection(timeout=10) as fresh:
        assert await (await fresh.execute("SELECT 1")).fetchone() == (1,)
    await until(lambda: counts(pool) == (3, 3, 0), timeout=10, what="refilled")


async def test_a_waiting_borrower_takes_a_parked_connection_while_connecting_fails(
    make_pool: MakePool, app_dsn: str
) -> None:
    # Below max_size a borrower waits for a new connection; when opening one fails (here:
    # the password was rotated under the pool), the connection a thread keeps parked
    # serves it instead of the wait ending in a timeout.
    password = conninfo_to_dict(app_dsn).get("password")
    attempts: list[int] = []

    def secret() -> Any:
        attempts.append(1)
        return password if len(attempts) == 1 else "rotated-away"

    pool = await make_pool(min_size=1, max_size=2, kwargs={"password": secret})
    conn = await pool.getconn()
    pid = conn.info.backend_pid
    assert pool._park(conn)
    other = await pool.getconn(timeout=5)
    assert other.info.backend_pid == pid and len(attempts) >= 2
    assert not pool._unpark(conn)
    await pool.putconn(other)
    # While connecting still fails, the next borrower takes a parked one at once.
    again = await pool.getconn(timeout=5)
    assert pool._park(again)
    last = await pool.getconn(timeout=5)
    assert last.info.backend_pid == pid
    await pool.putconn(last)
    assert pool.stats()["timeouts"] == 0


async def test_close_does_not_wait_for_parked_connections(
    make_pool: MakePool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="poolkit.leak")
    pool = await make_pool(min_size=2, max_size=2)
    conn = await pool.getconn()
    assert pool._park(conn)
    await pool.close(timeout=30)  # a drain: parked connections are not borrowed ones
    assert not [r for r in caplog.records if "still borrowed" in r.getMessage()]
    assert conn.closed
    assert not pool._unpark(conn)


async def test_a_waiting_borrower_gets_the_next_parked_connection(make_pool: MakePool) -> None:
    # The parker sees the line and gives its connection back instead of parking it.
    pool = await make_pool(min_size=1, max_size=1)
    conn = await pool.getconn()

    async def borrow() -> int:
        async with pool.connection(timeout=10) as other:
            return int(other.info.backend_pid)

    async def park_when_waited_for() -> bool:
        await until(lambda: pool.stats()["waiting"] == 1, timeout=10, what="a borrower waits")
        parked = pool._park(conn)
        if not parked:
            await pool.putconn(conn)
        return parked

    pid, parked = await gather(borrow, park_when_waited_for)
    assert parked is False and isinstance(pid, int)
    assert counts(pool) == (1, 1, 0)


async def test_a_borrower_joining_the_line_as_a_connection_is_parked_gets_it(
    make_pool: MakePool,
) -> None:
    # The race parking without the lock must win: the borrower found nothing parked, then
    # the parker parked, seeing no one in line, then the borrower joined the line. Forced
    # here by parking inside the line's append(); the borrower must look again after
    # joining and take the parked connection instead of waiting for its timeout.
    pool = await make_pool(min_size=1, max_size=1)
    conn = await pool.getconn()
    pid = conn.info.backend_pid
    parked: list[bool] = []

    class ParkFirst(deque):  # type: ignore[type-arg]
        def append(self, waiter: Any) -> None:
            if not parked:
                parked.append(pool._park(conn))
            super().append(waiter)

    pool._waiting = ParkFirst(pool._waiting)
    other = await pool.getconn(timeout=2)
    assert parked == [True]
    assert other.info.backend_pid == pid
    assert not pool._unpark(conn)
    await pool.putconn(other)
    assert counts(pool) == (1, 1, 0)


async def test_a_parker_sees_a_borrower_that_joined_the_line_as_it_parked(
    make_pool: MakePool,
) -> None:
    # The other side of the same race: the parker found no one in line, then a borrower
    # (another thread) joined the line, finding nothing parked, then the parker parked.
    # The parker must look at the line again and give its connection back instead.
    if ASYNC:
        pytest.skip("one thread: no borrower can join the line while a connection parks")
    pool = await make_pool(min_size=1, max_size=1)
    conn = await pool.getconn()
    pid = conn.info.backend_pid
    borrower: list[Any] = []

    async def borrow() -> int:
        async with pool.connection(timeout=2) as other:
            return int(other.info.backend_pid)

    class JoinFirst(dict):  # type: ignore[type-arg]
        def __setitem__(self, key: Any, value: Any) -> None:
            if not borrower:
                borrower.append(spawn(borrow))
                deadline = time.monotonic() + 10
                while not pool._waiting and time.monotonic() < deadline:
                    time.sleep(0.005)
            super().__setitem__(key, value)

    pool._parked = JoinFirst()
    parked = pool._park(conn)
    assert pool._waiting or borrower[0].done(), "the borrower never joined the line"
    assert parked is False
    await pool.putconn(conn)
    assert await borrower[0].join(10) == pid
    assert counts(pool) == (1, 1, 0)


async def test_a_parked_connection_too_old_to_take_over_is_closed_once(
    make_pool: MakePool,
) -> None:
    # Past max_lifetime before housekeeping came by: the borrower taking it over closes
    # it and gets a new connection. It was closed twice (size off by one, a connection
    # above max_size opened in its place).
    pool = await make_pool(min_size=1, max_size=1, max_lifetime=0.3, housekeeping=3600)
    conn = await pool.getconn()
    assert pool._park(conn)
    await sleep(0.5)
    other = await pool.getconn(timeout=10)
    await other.execute("SELECT 1")
    stats = pool.stats()
    assert (stats["size"], stats["in_use"], stats["idle"]) == (1, 1, 0)
    assert (stats["connections_created"], stats["connections_closed"]) == (2, 1)
    assert not pool._unpark(conn)
    await pool.putconn(other)


async def test_a_parked_connection_given_back_as_it_is_taken_over_stays_taken(
    make_pool: MakePool,
) -> None:
    # putconn() of a parked handle while another borrower takes the connection over: the
    # give-back must see that it lost the connection, not reset the new borrow's state.
    if ASYNC:
        pytest.skip("one thread: no borrower can take it over in the middle of putconn()")
    pool = await make_pool(min_size=1, max_size=1)
    conn = await pool.getconn()
    assert pool._park(conn)
    taken: list[Any] = []
    slot = pool._lent[id(conn)]

    def steal() -> None:
        taken.append(pool.getconn(timeout=5))

    # The steal is forced between putconn()'s first look at the slot (its class) and its
    # look at `parked`, by a tracer that runs it in another thread at that line.
    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code.co_name != "_return" or frame.f_code.co_filename != returns.__file__:
            return None

        def line(f: Any, ev: str, a: Any) -> Any:
            if ev == "line" and not taken and "slot.parked" in _source_line(f):
                t = threading.Thread(target=steal)
                t.start()
                t.join(10)
            return line

        return line

    sys.settrace(tracer)
    try:
        with pytest.raises(ValueError, match="not lent"):
            await pool.putconn(conn)
    finally:
        sys.settrace(None)
    assert taken and slot.conn is not None
    other = taken[0]
    assert other._pool is pool  # the new borrow's mark is intact
    await other.execute("SELECT 1")
    await pool.putconn(other)
    assert counts(pool) == (1, 1, 0)


def _source_line(frame: Any) -> str:
    return linecache.getline(frame.f_code.co_filename, frame.f_lineno)


async def test_parking_under_contention_never_lends_one_connection_twice(
    make_pool: MakePool,
) -> None:
    # Django's gthread workers with CONN_MAX_AGE: each worker parks its connection between
    # requests; with more workers than connections they take each other's. Whatever the
    # interleaving, one server connection serves one borrower at a time, no borrow waits
    # for ever, and the books add up.
    pool = await make_pool(min_size=2, max_size=2, timeout=20)
    users: dict[int, int] = {}  # backend pid -> worker using it now

    async def worker(n: int) -> int:
        rnd = random.Random(n)
        conn: Any = None
        served = 0
        for _ in range(60):
            if conn is None or not pool._unpark(conn):
                conn = await pool.getconn()
            pid = conn.info.backend_pid
            assert users.setdefault(pid, n) == n, f"backend {pid} lent twice"
            await conn.execute("SELECT 1")
            if rnd.random() < 0.3:
                await sleep(0.001)
            del users[pid]
            served += 1
            if not pool._park(conn):
                await pool.putconn(conn)
                conn = None
        if conn is not None and pool._unpark(conn):
            await pool.putconn(conn)
        return served

    results = await gather(*[lambda n=n: worker(n) for n in range(5)])
    assert results == [60] * 5, results
    await until(lambda: counts(pool) == (2, 2, 0), timeout=10, what="everything back")
    stats = pool.stats()
    assert stats["timeouts"] == 0
    assert stats["borrows"] == 300


async def test_a_parked_connection_whose_handle_is_dropped_comes_back(
    make_pool: MakePool,
) -> None:
    pool = await make_pool(min_size=1, max_size=1)
    conn: psycopg.AsyncConnection[Any] | None = await pool.getconn()
    assert conn is not None and pool._park(conn)
    conn = None  # the parker went away without a word
    async with pool.connection(timeout=5) as other:
        await other.execute("SELECT 1")
    assert counts(pool) == (1, 1, 0)
