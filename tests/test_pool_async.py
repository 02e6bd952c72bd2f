"""AsyncPool against a real server: each behaviour that sets poolkit apart from psycopg_pool."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import select
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import pytest

from poolkit import AsyncPool, ConnectFailed, PoolClosed, PoolTimeout, TooManyRequests
from tests._helpers import backend_count, backend_pids, terminate_backends, wait_until
from tests._proxy import TcpProxy
from tests._tcompat_async import Barrier, Event, fixture, gather, sleep, spawn, to_thread, until

pytestmark = pytest.mark.asyncio  # async-only
MakePool = Callable[..., Awaitable[AsyncPool[Any]]]  # async-only
# sync: MakePool = Callable[..., Pool[Any]]
HERE = os.path.basename(__file__)  # borrow sites name this file


@fixture
async def make_pool(app_dsn: str) -> AsyncIterator[MakePool]:
    pools: list[AsyncPool[Any]] = []

    async def make(
        conninfo: str | None = None, *, housekeeping: float = 0.05, **kw: Any
    ) -> AsyncPool[Any]:
        kw.setdefault("min_size", 1)
        pool: AsyncPool[Any] = AsyncPool(conninfo or app_dsn, open=False, **kw)
        pool.housekeeping_interval = housekeeping
        pools.append(pool)
        await pool.open(wait=True, timeout=30)
        return pool

    yield make
    for pool in pools:
        await pool.close(timeout=0)


def pid_of(conn: psycopg.AsyncConnection[Any]) -> int:
    return conn.info.backend_pid


async def one(conn: psycopg.AsyncConnection[Any], sql: str) -> Any:
    cur = await conn.execute(sql)
    return await cur.fetchone()


async def test_borrow_commits_and_rolls_back(make_pool: MakePool, admin_conn: Any) -> None:
    pool = await make_pool()
    admin_conn.execute("CREATE TABLE IF NOT EXISTS pk_pool_t (v int)")
    admin_conn.execute("TRUNCATE pk_pool_t")
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO pk_pool_t VALUES (1)")

    async def fail() -> None:
        async with pool.connection() as conn:
            await conn.execute("INSERT INTO pk_pool_t VALUES (2)")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await fail()
    rows = admin_conn.execute("SELECT v FROM pk_pool_t ORDER BY v").fetchall()
    assert rows == [(1,)]
    assert pool.stats()["in_use"] == 0


async def test_bypass_window_lends_recent_connections_without_round_trip(
    make_pool: MakePool,
) -> None:
    pool = await make_pool(validation_bypass=60.0)
    for _ in range(3):
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
    st = pool.stats()
    assert st["validations_run"] == 0
    assert st["validations_skipped"] == 3


async def test_check_connection_as_check_is_the_builtin_validation(make_pool: MakePool) -> None:
    # psycopg_pool's recipe check=Pool.check_connection (Django's pool for CONN_HEALTH_CHECKS)
    # means the pool's own validation: kept as pool._check, bypass window honoured; with
    # validate=False it runs as given, on every borrow outside the window.
    pool = await make_pool(validation_bypass=60.0, check=AsyncPool.check_connection)
    assert pool._check is AsyncPool.check_connection
    for _ in range(3):
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
    assert pool.stats()["validations_run"] == 0
    plain = await make_pool(validate=False, check=AsyncPool.check_connection)
    for _ in range(2):
        async with plain.connection():
            pass
    assert plain.stats()["validations_run"] >= 1


async def test_validation_outside_bypass_window(make_pool: MakePool) -> None:
    pool = await make_pool(validation_bypass=0.05)
    async with pool.connection():
        pass
    await sleep(0.1)
    async with pool.connection() as conn:
        await conn.execute("SELECT 1")
    assert pool.stats()["validations_run"] == 1


async def test_failed_validation_replaces_connection_transparently(
    make_pool: MakePool, admin_dsn: str, app_name: str
) -> None:
    pool = await make_pool(validation_bypass=60.0)
    async with pool.connection() as conn:
        old = pid_of(conn)
    terminate_backends(admin_dsn, application_name=app_name)
    wait_until(lambda: backend_count(admin_dsn, app_name) == 0, what="backend terminated")
    async with pool.connection() as conn:
        assert await one(conn, "SELECT 1") == (1,)
        assert pid_of(conn) != old
    st = pool.stats()
    assert st["validations_failed"] == 1
    assert st["connections_lost"] >= 1


@pytest.mark.timing
async def test_bulk_recovery_after_all_backends_terminated(
    make_pool: MakePool, admin_dsn: str, app_name: str
) -> None:
    pool = await make_pool(min_size=8, max_size=8, timeout=30.0)
    assert backend_count(admin_dsn, app_name) == 8
    terminate_backends(admin_dsn, application_name=app_name)
    wait_until(lambda: backend_count(admin_dsn, app_name) == 0, what="backends terminated")
    t0 = time.monotonic()
    async with pool.connection() as conn:
        assert await one(conn, "SELECT 1") == (1,)
    # psycopg_pool with check= tests the 8 stale connections one by one with backoff
    # and times out here; poolkit drops them all at the first failure.
    assert time.monotonic() - t0 < 2.0
    # One dead connection was examined; the seven older idle ones went with it, unexamined.
    assert pool.stats()["validations_failed"] == 1
    conns = [await pool.getconn(timeout=10) for _ in range(8)]
    try:
        for conn in conns:
            assert await one(conn, "SELECT 1") == (1,)
    finally:
        for conn in conns:
            await pool.putconn(conn)


async def test_recovers_after_server_restart(make_pool: MakePool, pg_control: Any) -> None:
    pool = await make_pool(min_size=4, max_size=4, timeout=30.0)
    await to_thread(pg_control.stop)
    await to_thread(pg_control.start)
    for _ in range(6):
        async with pool.connection(timeout=30) as conn:
            assert await one(conn, "SELECT 1") == (1,)
    assert pool.stats()["connections_lost"] >= 1


async def test_max_lifetime_enforced_at_borrow(make_pool: MakePool) -> None:
    pool = await make_pool(min_size=1, max_size=1, max_lifetime=0.3)
    async with pool.connection() as conn:
        first = pid_of(conn)
    # Returned well before it expired; psycopg_pool would lend it again.
    await sleep(0.5)
    async with pool.connection() as conn:
        assert pid_of(conn) != first


async def test_max_idle_enforced_at_borrow_even_at_min_size(make_pool: MakePool) -> None:
    pool = await make_pool(min_size=1, max_size=1, max_idle=0.3)
    async with pool.connection() as conn:
        first = pid_of(conn)
    await sleep(0.5)
    async with pool.connection() as conn:
        assert pid_of(conn) != first


async def test_leak_warning_names_borrow_site_and_return(
    make_pool: MakePool, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await make_pool(leak_threshold=0.2)
    caplog.set_level(logging.INFO, logger="poolkit.leak")
    conn = await pool.getconn()
    warned = await until(
        lambda: [r for r in caplog.records if r.levelno == logging.WARNING],
        what="leak warning",
    )
    text = warned[0].getMessage()
    assert "test_leak_warning_names_borrow_site_and_return" in text
    assert HERE in text
    assert "leak_threshold" in text
    assert len(warned) == 1  # once per borrow
    await pool.putconn(conn)
    assert any(r.levelno == logging.INFO and "came back" in r.getMessage() for r in caplog.records)
    assert pool.stats()["leaks_detected"] == 1


async def test_garbage_collected_borrow_gets_slot_back(
    make_pool: MakePool, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await make_pool(min_size=1, max_size=1)
    conn = await pool.getconn()
    await conn.execute("SELECT 1")
    del conn
    gc.collect()
    await until(lambda: pool.stats()["leaks_reclaimed"] == 1, what="slot reclaimed")
    # With psycopg_pool the only slot would be lost forever: this would time out.
    async with pool.connection(timeout=10) as conn:
        assert await one(conn, "SELECT 1") == (1,)
    assert pool.stats()["in_use"] == 0
    assert any("garbage-collected" in r.getMessage() for r in caplog.records)


def _read_child(fd: int, pid: int) -> str:
    ready, _, _ = select.select([fd], [], [], 30)
    data = os.read(fd, 65536).decode() if ready else "TIMEOUT"
    os.waitpid(pid, 0)
    return data


def _thread_stacks() -> str:
    """Every thread's stack (a failed child says where its worker was stuck)."""
    import faulthandler
    import tempfile

    with tempfile.TemporaryFile("w+") as f:
        faulthandler.dump_traceback(f, all_threads=True)
        f.seek(0)
        return f.read()


async def _child_borrow(pool: AsyncPool[Any]) -> int:
    async with pool.connection(timeout=10) as conn:
        return pid_of(conn)


async def test_fork_child_builds_its_own_connections(make_pool: MakePool) -> None:
    pool = await make_pool(min_size=2, max_size=2)
    conns = [await pool.getconn(), await pool.getconn()]
    parent_pids = {pid_of(c) for c in conns}
    for c in conns:
        await pool.putconn(c)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report the backend it gets, never return into pytest
        code = 1
        try:
            # >>> async-only
            # The child inherits "a loop is running" from the parent's thread state;
            # a forked worker (gunicorn, multiprocessing) starts a fresh loop, as here.
            asyncio.events._set_running_loop(None)
            run = asyncio.new_event_loop().run_until_complete
            # <<<
            child_pid = run(_child_borrow(pool))  # sync: child_pid = _child_borrow(pool)
            os.write(wfd, str(child_pid).encode())
            code = 0
        except BaseException as ex:
            os.write(wfd, f"ERR {ex!r}\n{_thread_stacks()[-30000:]}".encode())
        finally:
            os._exit(code)
    os.close(wfd)
    try:
        child = await to_thread(_read_child, rfd, pid)
    finally:
        os.close(rfd)
    assert child.isdigit(), child
    assert int(child) not in parent_pids
    # The parent's connections were not disturbed by the child.
    conns = [await pool.getconn(), await pool.getconn()]
    try:
        assert {pid_of(c) for c in conns} == parent_pids
        for c in conns:
            assert await one(c, "SELECT 1") == (1,)
    finally:
        for c in conns:
            await pool.putconn(c)
    assert pool.stats()["connections_lost"] == 0


@pytest.mark.parametrize("reset", ["auto", "reset_all", "discard_all"])
async def test_session_state_is_reset_between_borrows(make_pool: MakePool, reset: str) -> None:
    pool = await make_pool(min_size=1, max_size=1, reset=reset)
    async with pool.connection() as conn:
        default_path = await one(conn, "SHOW search_path")
        await conn.execute("SET statement_timeout = '4s'")
        await conn.execute("SET search_path = pg_catalog")
        await conn.commit()
        await conn.set_autocommit(True)  # sync: conn.autocommit = True
    async with pool.connection() as conn:
        assert await one(conn, "SHOW statement_timeout") == ("0",)
        assert await one(conn, "SHOW search_path") == default_path
        assert conn.autocommit is False
    assert pool.stats()["resets"] >= 1


async def test_session_state_leaks_with_reset_none(make_pool: MakePool) -> None:
    pool = await make_pool(min_size=1, max_size=1, reset="none")
    async with pool.connection() as conn:
        await conn.execute("SET statement_timeout = '4s'")
    async with pool.connection() as conn:
        assert await one(conn, "SHOW statement_timeout") == ("4s",)


@pytest.mark.timing
async def test_reset_runs_off_the_borrowers_path(
    make_pool: MakePool, proxy: TcpProxy, dsn: str
) -> None:
    pool = await make_pool(proxy.dsn_for(dsn), min_size=1, max_size=1)
    conn = await pool.getconn()
    await conn.execute("SET statement_timeout = '4s'")
    await conn.commit()
    proxy.delay(1.0)
    t0 = time.monotonic()
    await pool.putconn(conn)
    # The reset is sent, not awaited: a 1 s network delay does not reach putconn.
    assert time.monotonic() - t0 < 0.5
    proxy.delay(0.0)
    async with pool.connection(timeout=10) as conn:
        assert await one(conn, "SHOW statement_timeout") == ("0",)


async def test_timeout_message_describes_pool_and_longest_borrow(make_pool: MakePool) -> None:
    pool = await make_pool(min_size=1, max_size=1, name="tm-pool")
    held = await pool.getconn()
    try:
        with pytest.raises(PoolTimeout) as ei:
            await pool.getconn(timeout=0.2)
    finally:
        await pool.putconn(held)
    msg = str(ei.value)
    for part in ("'tm-pool'", "after 0.2", "size=1", "idle=0", "in_use=1", "waiting="):
        assert part in msg, (part, msg)
    assert HERE in msg
    assert "test_timeout_message_describes_pool_and_longest_borrow" in msg
    assert pool.stats()["timeouts"] == 1


async def test_max_waiting_rejects(make_pool: MakePool) -> None:
    pool = await make_pool(min_size=1, max_size=1, max_waiting=1)
    held = await pool.getconn()

    async def wait_in_line() -> None:
        with pytest.raises(PoolTimeout):
            await pool.getconn(timeout=2)

    waiter = spawn(wait_in_line)
    await until(lambda: pool.stats()["waiting"] == 1, what="one waiter")
    with pytest.raises(TooManyRequests):
        await pool.getconn(timeout=1)
    await waiter.join(10)  # its own PoolTimeout came, after 2 s
    await pool.putconn(held)
    assert pool.stats()["rejected"] == 1


async def test_graceful_drain_waits_for_borrowers(
    make_pool: MakePool, admin_conn: Any, admin_dsn: str, app_name: str
) -> None:
    admin_conn.execute("CREATE TABLE IF NOT EXISTS pk_pool_drain (v int)")
    admin_conn.execute("TRUNCATE pk_pool_drain")
    pool = await make_pool(min_size=2, max_size=2)
    borrowed, release = Event(), Event()

    async def borrower() -> None:
        async with pool.connection() as conn:
            borrowed.set()
            assert await release.wait(20)
            await conn.execute("INSERT INTO pk_pool_drain VALUES (1)")

    task = spawn(borrower)
    assert await borrowed.wait(10)
    closer = spawn(lambda: pool.close(timeout=20))
    await until(lambda: pool._draining, what="draining")
    with pytest.raises(PoolClosed, match="closing"):
        await pool.getconn(timeout=1)
    assert not closer.done()  # still waiting for the borrower
    release.set()
    await task.join(10)
    await closer.join(10)
    assert closer.done()
    assert pool.closed
    assert admin_conn.execute("SELECT count(*) FROM pk_pool_drain").fetchone() == (1,)
    wait_until(lambda: backend_count(admin_dsn, app_name) == 0, what="all closed")


async def test_drain_gives_up_after_timeout(
    make_pool: MakePool, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await make_pool()
    conn = await pool.getconn()
    await pool.close(timeout=0.2)
    assert pool.closed
    assert any("still borrowed" in r.getMessage() for r in caplog.records)
    await pool.putconn(conn)  # a late return is closed, not lost
    assert conn.closed


@pytest.mark.timing
async def test_black_holed_network_never_hangs_past_timeout(
    make_pool: MakePool, proxy: TcpProxy, dsn: str
) -> None:
    pool = await make_pool(proxy.dsn_for(dsn), min_size=1, max_size=1, validation_bypass=0.0)
    async with pool.connection() as conn:
        await conn.execute("SELECT 1")
    proxy.deaf(True)
    t0 = time.monotonic()
    with pytest.raises(PoolTimeout):
        await pool.getconn(timeout=1.0)
    assert time.monotonic() - t0 < 5.0
    proxy.deaf(False)

    deadline = time.monotonic() + 60
    while True:
        try:
            async with pool.connection(timeout=2) as conn:
                assert await one(conn, "SELECT 1") == (1,)
                break
        except PoolTimeout:
            assert time.monotonic() < deadline, "pool did not recover after the black hole"


async def test_stats_snapshot_counts(make_pool: MakePool) -> None:
    pool = await make_pool(min_size=2, max_size=3)
    async with pool.connection() as conn:
        await conn.execute("SELECT 1")
        st = pool.stats()
        assert (st["in_use"], st["idle"], st["size"]) == (1, 1, 2)
    st = pool.stats()
    assert st["borrows"] == 1
    assert st["hold_time"]["count"] == 1
    assert st["wait_time"]["count"] == 1
    assert st["connect_time"]["count"] == 2
    assert st["connections_created"] == 2
    assert (st["min_size"], st["max_size"], st["overflow"]) == (2, 3, 0)
    legacy = pool.get_stats()
    assert legacy["pool_size"] == 2
    assert legacy["requests_num"] == 1


async def test_overflow_and_hand_off_to_waiters(
    make_pool: MakePool, admin_dsn: str, app_name: str
) -> None:
    pool = await make_pool(min_size=1, max_size=3)
    held = [await pool.getconn(timeout=10) for _ in range(3)]
    assert pool.stats()["overflow"] == 2
    assert backend_pids(admin_dsn, app_name)
    got: list[int] = []

    async def waiter() -> None:
        async with pool.connection(timeout=10) as conn:
            got.append(pid_of(conn))

    task = spawn(waiter)
    await until(lambda: pool.stats()["waiting"] == 1, what="a waiter")
    await pool.putconn(held.pop())
    await task.join(10)
    assert len(got) == 1
    for c in held:
        await pool.putconn(c)
    assert pool.stats()["in_use"] == 0


# >>> async-only
async def test_cancelled_waiter_loses_no_connection(make_pool: MakePool) -> None:
    pool = await make_pool(min_size=1, max_size=1)
    held = await pool.getconn()
    task = asyncio.create_task(pool.getconn(timeout=10))
    await until(lambda: pool.stats()["waiting"] == 1, what="a waiter")
    await pool.putconn(held)  # handed to the waiter...
    task.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await task
    async with pool.connection(timeout=5) as conn:
        assert await one(conn, "SELECT 1") == (1,)
    assert pool.stats()["in_use"] == 0


# <<<
async def test_keepalive_pings_idle_connections(make_pool: MakePool) -> None:
    pool = await make_pool(min_size=2, max_size=2, keepalive_interval=0.1)
    await until(lambda: pool.stats()["validations_run"] >= 2, what="keepalive pings")
    assert pool.stats()["borrows"] == 0
    # A connection is out of the idle list only while it is being pinged.
    await until(lambda: pool.stats()["idle"] == 2, what="both idle")


async def test_check_replaces_broken_idle_connections(
    make_pool: MakePool, admin_dsn: str, app_name: str
) -> None:
    pool = await make_pool(min_size=2, max_size=2)
    terminate_backends(admin_dsn, application_name=app_name)
    wait_until(lambda: backend_count(admin_dsn, app_name) == 0, what="backends terminated")
    await pool.check()
    await until(lambda: backend_count(admin_dsn, app_name) == 2, what="replacements")
    async with pool.connection() as conn:
        assert await one(conn, "SELECT 1") == (1,)
    assert pool.stats()["connections_lost"] >= 1


async def test_auto_reset_only_after_session_changes(make_pool: MakePool) -> None:
    pool = await make_pool(min_size=1, max_size=1)
    async with pool.connection() as conn:
        await conn.execute("SELECT 1")
        await conn.execute("SELECT now()")
    assert pool.stats()["resets"] == 0  # nothing session-level was SET: no round trip
    async with pool.connection() as conn:
        await conn.execute("LISTEN pk_channel")
        await conn.execute("SET application_name = 'changed'")
    async with pool.connection() as conn:
        assert await one(conn, "SELECT count(*) FROM pg_listening_channels()") == (0,)
        assert await one(conn, "SHOW application_name") != ("changed",)
    assert pool.stats()["resets"] == 1


async def test_swallowed_error_is_not_reported_as_commit(
    make_pool: MakePool, admin_conn: Any
) -> None:
    pool = await make_pool()
    admin_conn.execute("CREATE TABLE IF NOT EXISTS pk_pool_fail (v int)")
    admin_conn.execute("TRUNCATE pk_pool_fail")

    async def swallow() -> None:
        async with pool.connection() as conn:
            await conn.execute("INSERT INTO pk_pool_fail VALUES (1)")
            with contextlib.suppress(psycopg.errors.DivisionByZero):
                await conn.execute("SELECT 1/0")

    with pytest.raises(psycopg.errors.InFailedSqlTransaction):
        await swallow()
    assert admin_conn.execute("SELECT count(*) FROM pk_pool_fail").fetchone() == (0,)
    assert pool.stats()["in_use"] == 0


async def test_open_timeout_names_the_connection_error(app_dsn: str) -> None:
    bad = app_dsn.replace("poolkit-secret", "wrong-secret")
    pool: AsyncPool[Any] = AsyncPool(bad, min_size=1, open=False)
    await pool.open()
    try:
        # A wrong password is permanent: the first attempt's answer, not the timeout.
        with pytest.raises(ConnectFailed) as ei:
            await pool.wait(timeout=60)
    finally:
        await pool.close(timeout=0)
    msg = str(ei.value)
    assert msg.startswith("FATAL: password authentication failed"), msg
    assert "check the user and password" in msg
    assert "wrong-secret" not in msg


async def _child_first_borrows(pool: AsyncPool[Any]) -> int:
    sys.setswitchinterval(1e-6)  # widen any race window between threads
    barrier = Barrier(8)

    async def work() -> None:
        await barrier.wait(30)  # the first borrows start together
        for _ in range(5):
            async with pool.connection(timeout=5) as c:
                await c.execute("SELECT 1")

    results = await gather(*[work] * 8)
    errors = [r for r in results if isinstance(r, BaseException)]
    lost = pool.stats()["connections_lost"]
    if errors or lost:  # the parent only sees the exit code: say why on stderr
        print(f"child {os.getpid()}: lost={lost} errors={errors!r}", file=sys.stderr)
        return 1
    return 0


async def test_fork_rebuild_is_safe_under_concurrent_first_borrows(make_pool: MakePool) -> None:
    pool = await make_pool(min_size=2, max_size=4, timeout=5.0)
    async with pool.connection() as conn:
        await conn.execute("SELECT 1")
    bad = 0
    for _ in range(5):
        pid = os.fork()
        if pid == 0:  # child: 8 workers make the first borrows at once
            code = 1
            try:
                # >>> async-only
                asyncio.events._set_running_loop(None)  # a fresh loop, as a forked worker's
                run = asyncio.new_event_loop().run_until_complete
                # <<<
                code = run(_child_first_borrows(pool))  # sync: code = _child_first_borrows(pool)
            finally:
                os._exit(code)
        _, status = await to_thread(os.waitpid, pid, 0)
        bad += os.WEXITSTATUS(status) != 0
    assert bad == 0


async def test_close_does_not_wait_for_the_callers_own_borrow(make_pool: MakePool) -> None:
    pool = await make_pool(drain_timeout=60.0)
    conn = await pool.getconn()  # the caller holds it: it cannot come back while close() waits
    t0 = time.monotonic()
    await pool.close()
    assert time.monotonic() - t0 < 30.0
    await pool.putconn(conn)
    assert conn.closed
