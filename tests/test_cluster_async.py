"""AsyncClusterPool on a real primary + streaming standby: failover, lag, routing, faults."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import pytest

from example_apps._embedded_pg import DEFAULT_PASSWORD
from example_apps._embedded_pg import _free_port as free_port
from poolkit import (
    AsyncClusterPool,
    ConfigError,
    ConnectFailed,
    ConnectionReturned,
    PoolClosed,
    PoolTimeout,
)
from tests._helpers import terminate_backends
from tests._replication import Replication
from tests._tcompat_async import fixture, sleep, until

pytestmark = pytest.mark.asyncio  # async-only
MakeCluster = Callable[..., Awaitable[AsyncClusterPool[Any]]]  # async-only
# sync: MakeCluster = Callable[..., ClusterPool[Any]]


@fixture
async def make_cluster(replication: Replication, app_name: str) -> AsyncIterator[MakeCluster]:
    clusters: list[AsyncClusterPool[Any]] = []

    async def make(conninfo: Any = None, **kw: Any) -> AsyncClusterPool[Any]:
        kw.setdefault("min_size", 1)
        kw.setdefault("max_size", 4)
        kw.setdefault("application_name", app_name)
        cluster: AsyncClusterPool[Any] = AsyncClusterPool(conninfo or replication.dsns, **kw)
        clusters.append(cluster)
        await cluster.open()
        await cluster.wait(15)
        return cluster

    yield make
    for cluster in clusters:
        await cluster.close(timeout=0)


async def in_recovery(conn: psycopg.AsyncConnection[Any]) -> bool:
    row = await (await conn.execute("SELECT pg_is_in_recovery()")).fetchone()
    return bool(row and row[0])


def host_stats(cluster: AsyncClusterPool[Any], label: str) -> dict[str, Any]:
    return next(dict(h) for h in cluster.stats()["hosts"] if h["host"] == label)


async def test_roles_learned_and_stats(make_cluster: MakeCluster, replication: Replication) -> None:
    cluster = await make_cluster()
    stats = cluster.stats()
    assert stats["primary"] == replication.label(replication.primary)
    primary, replica = stats["hosts"]
    assert (primary["role"], primary["healthy"], primary["lag"]) == ("primary", True, None)
    assert (replica["role"], replica["healthy"]) == ("replica", True)
    assert replica["lag"] is not None and replica["lag"] < 5
    assert stats["size"] == primary["size"] + replica["size"] >= 2
    assert stats["in_use"] == 0


async def test_wait_covers_a_replica_whose_pool_is_still_starting(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A host counts as reached when its probe answers, a moment before its pool exists
    # (a loaded machine widens that moment; the sleep makes it certain): wait() must not
    # return in between, or the first read-only borrow goes to the primary.
    start_pool = AsyncClusterPool._start_pool

    async def slow_start(self: AsyncClusterPool[Any], host: Any) -> None:
        if host.role == "replica":
            await sleep(0.5)
        await start_pool(self, host)

    monkeypatch.setattr(AsyncClusterPool, "_start_pool", slow_start)
    cluster = await make_cluster()
    assert [h["size"] >= 1 for h in cluster.stats()["hosts"]] == [True, True]
    async with cluster.connection(read_only=True) as conn:
        assert await in_recovery(conn)


async def test_multi_host_conninfo(make_cluster: MakeCluster, replication: Replication) -> None:
    # The standby first: order says nothing about roles.
    dsn = replication.multi_host_dsn()
    dsn = dsn.replace(
        f"{replication.primary.port},{replication.standby.port}",
        f"{replication.standby.port},{replication.primary.port}",
    )
    cluster = await make_cluster(dsn)
    assert [h["role"] for h in cluster.stats()["hosts"]] == ["replica", "primary"]
    async with cluster.connection() as conn:
        assert not await in_recovery(conn)


async def test_reads_go_to_replica_in_read_only_transaction(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster()
    async with cluster.connection(read_only=True) as conn:
        assert await in_recovery(conn)
        assert await (await conn.execute("SHOW transaction_read_only")).fetchone() == ("on",)
    async with cluster.connection() as conn:
        assert not await in_recovery(conn)
        await conn.execute("CREATE TEMP TABLE t (x int)")
    conn = await cluster.getconn(read_only=True)
    try:
        assert await in_recovery(conn)
    finally:
        await cluster.putconn(conn)
    assert cluster.stats()["in_use"] == 0


async def test_lagging_replica_falls_back_to_primary(
    make_cluster: MakeCluster, replication: Replication
) -> None:
    cluster = await make_cluster(max_replica_lag=0.5, autocommit=True)
    replication.pause_replay()
    replication.write()
    label = replication.label(replication.standby)
    await until(lambda: (host_stats(cluster, label)["lag"] or 0) > 0.5, timeout=10, what="lag")
    async with cluster.connection(read_only=True) as conn:
        assert not await in_recovery(conn)
        # An autocommit read on the primary is still read-only.
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            await conn.execute("CREATE TEMP TABLE t (x int)")
    async with cluster.connection() as conn:  # the session setting did not leak to writers
        await conn.execute("CREATE TEMP TABLE t (x int)")
    assert cluster.stats()["reads_on_primary"] >= 1


async def test_lagging_replica_fallback_error(
    make_cluster: MakeCluster, replication: Replication
) -> None:
    cluster = await make_cluster(max_replica_lag=0.5, fallback="error")
    replication.pause_replay()
    replication.write()
    label = replication.label(replication.standby)
    await until(lambda: (host_stats(cluster, label)["lag"] or 0) > 0.5, timeout=10, what="lag")
    with pytest.raises(PoolTimeout, match="found no replica within max_replica_lag"):
        await cluster.getconn(timeout=5, read_only=True)


async def test_stopped_replica_reads_move_away(
    make_cluster: MakeCluster, replication: Replication
) -> None:
    cluster = await make_cluster()
    async with cluster.connection(read_only=True) as conn:
        assert await in_recovery(conn)
    replication.stop_standby()
    label = replication.label(replication.standby)
    await until(lambda: not host_stats(cluster, label)["healthy"], timeout=5, what="down")
    for _ in range(20):
        async with cluster.connection(read_only=True, timeout=5) as conn:
            assert not await in_recovery(conn)
    assert host_stats(cluster, label)["size"] == 0


@pytest.mark.slow
async def test_failover_writes_follow_promotion(
    make_cluster: MakeCluster, replication: Replication
) -> None:
    cluster = await make_cluster()
    held = await cluster.getconn()
    await held.execute("SELECT 1")
    await held.commit()
    new_primary = replication.failover()
    # A write sent to the demoted node fails: it is never acknowledged.
    with pytest.raises(psycopg.OperationalError):
        await held.execute("CREATE TABLE never_acked (x int)")
        await held.commit()
    await cluster.putconn(held)
    async with cluster.connection(timeout=5) as conn:
        assert not await in_recovery(conn)
        assert conn.info.port == new_primary.port
    stats = cluster.stats()
    assert stats["primary"] == replication.label(new_primary)
    assert stats["failovers"] >= 1
    assert stats["in_use"] == 0


@pytest.mark.slow
async def test_switchover_seen_without_waiting_for_the_interval(
    make_cluster: MakeCluster, replication: Replication
) -> None:
    # The writer flip: the old primary stays up read-only, the standby is promoted. A
    # refused write (or a new connection failing its role check) has the old primary
    # probed; with no primary left, the other hosts are probed at once too, not after
    # topology_interval (a minute here).
    cluster = await make_cluster(topology_interval=60)
    new_primary = replication.switchover()
    try:
        async with cluster.connection() as conn:
            await conn.execute("CREATE TEMP TABLE t (x int)")
            assert conn.info.port == new_primary.port  # the flip was seen already
    except psycopg.errors.ReadOnlySqlTransaction:
        pass  # sent to the old primary: refused, never acknowledged
    label = replication.label(new_primary)
    await until(lambda: cluster.stats()["primary"] == label, timeout=3, what="the new primary")
    async with cluster.connection(timeout=3) as conn:
        assert conn.info.port == new_primary.port
        assert not await in_recovery(conn)


async def test_primary_turns_read_only(make_cluster: MakeCluster, replication: Replication) -> None:
    cluster = await make_cluster()
    held = await cluster.getconn()
    replication.set_primary_read_only(True)
    label = replication.label(replication.primary)
    await until(lambda: host_stats(cluster, label)["role"] == "replica", timeout=5, what="flip")
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        await held.execute("CREATE TABLE flipped (x int)")
    await cluster.putconn(held)
    # Lent before the flip: closed once back (the retired pool closes as it drains).
    await until(lambda: held.closed, timeout=5, what="the old connection closed")
    with pytest.raises(PoolTimeout, match="found no primary"):
        await cluster.getconn(timeout=0.5)
    replication.set_primary_read_only(False)
    async with cluster.connection(timeout=5) as conn:
        await conn.execute("CREATE TEMP TABLE t (x int)")


async def test_write_only_cluster_opens_no_replica_pool(
    make_cluster: MakeCluster, replication: Replication
) -> None:
    cluster = await make_cluster(replica_pools=False)
    replica = host_stats(cluster, replication.label(replication.standby))
    assert (replica["role"], replica["healthy"], replica["size"]) == ("replica", True, 0)
    async with cluster.connection(read_only=True) as conn:
        assert not await in_recovery(conn)  # reads go to the primary
    assert cluster.stats()["reads_on_primary"] == 1


async def test_parked_connection_of_an_old_role_is_not_unparked(
    make_cluster: MakeCluster, replication: Replication
) -> None:
    # Django's CONN_MAX_AGE: a connection kept by its thread between requests.
    cluster = await make_cluster()
    conn = await cluster.getconn()
    assert cluster._park(conn)
    assert cluster.stats()["in_use"] == 0
    assert cluster._unpark(conn)
    assert cluster.stats()["in_use"] == 1
    assert cluster._park(conn)
    replication.set_primary_read_only(True)
    label = replication.label(replication.primary)
    await until(lambda: host_stats(cluster, label)["role"] == "replica", timeout=5, what="flip")
    assert not cluster._unpark(conn)
    await until(lambda: conn.closed, timeout=5, what="the parked connection closed")
    assert cluster.stats()["in_use"] == 0


async def test_parked_connection_taken_by_another_borrower(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(min_size=1, max_size=1)
    conn = await cluster.getconn()
    pid = conn.info.backend_pid
    assert cluster._park(conn)
    other = await cluster.getconn(timeout=2)  # at max_size: the pool takes the parked one
    assert other is not conn and other.info.backend_pid == pid  # a new handle on it
    assert not cluster._unpark(conn)  # its parker no longer has it
    with pytest.raises(ConnectionReturned):
        await conn.execute("SELECT 1")  # nor can it use it any more
    await cluster.putconn(other)
    assert cluster.stats()["in_use"] == 0


async def test_dropped_borrows_are_reclaimed(make_cluster: MakeCluster) -> None:
    # As with a single pool: a borrow dropped unreturned (or a parked connection whose
    # thread went away) comes back once collected, closed and replaced (its borrower's
    # state is unknown); the cluster's books must not keep it alive.
    cluster = await make_cluster(min_size=1, max_size=1, timeout=3)
    conn = await cluster.getconn()
    del conn
    gc.collect()
    again = await cluster.getconn(timeout=2)
    assert cluster._park(again)
    del again
    gc.collect()
    last = await cluster.getconn(timeout=2)
    assert cluster.stats()["in_use"] == 1
    await cluster.putconn(last)
    assert cluster.stats()["in_use"] == 0
    assert all(h["size"] <= 1 for h in cluster.stats()["hosts"])  # never above max_size


async def test_session_told_read_only_has_the_host_probed(
    make_cluster: MakeCluster, replication: Replication
) -> None:
    # Through getconn()/putconn(), as the integrations borrow: no error reaches the cluster,
    # but the server reported default_transaction_read_only=on to the session.
    cluster = await make_cluster(topology_interval=60)
    replication.set_primary_read_only(True)
    try:
        # The reload is signalled to the sessions asynchronously: until a new one sees it.
        await until(lambda: replication.primary.query("SHOW default_transaction_read_only")
                    == "on", timeout=5, what="the reload")  # fmt: skip
        conn = await cluster.getconn()
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            await conn.execute("CREATE TEMP TABLE t (x int)")
        await conn.rollback()
        await cluster.putconn(conn)
        label = replication.label(replication.primary)
        await until(lambda: host_stats(cluster, label)["role"] == "replica", timeout=2,
                    what="the probe after the report")  # fmt: skip
    finally:
        replication.set_primary_read_only(False)


async def test_terminated_backends_recover(
    make_cluster: MakeCluster, replication: Replication, app_name: str
) -> None:
    cluster = await make_cluster()
    async with cluster.connection() as conn:
        await conn.execute("SELECT 1")
    terminate_backends(replication.primary.admin_dsn, application_name=app_name)
    terminate_backends(replication.standby.admin_dsn, application_name=app_name)
    async with cluster.connection(timeout=5) as conn:
        assert not await in_recovery(conn)
    async with cluster.connection(timeout=5, read_only=True) as conn:
        assert await in_recovery(conn)


async def test_round_robin_and_random_policies(make_cluster: MakeCluster) -> None:
    for policy in ("round_robin", "random"):
        cluster = await make_cluster(read_policy=policy)
        async with cluster.connection(read_only=True) as conn:
            assert await in_recovery(conn)


async def test_bad_settings_and_closed_errors(replication: Replication) -> None:
    with pytest.raises(ConfigError, match="read_policy"):
        AsyncClusterPool(replication.dsns, read_policy="fastest")
    with pytest.raises(ConfigError, match="fallback"):
        AsyncClusterPool(replication.dsns, fallback="replica")
    with pytest.raises(ConfigError, match="topology_interval"):
        AsyncClusterPool(replication.dsns, topology_interval=0)
    with pytest.raises(ConfigError, match="hosts and 3 ports"):
        AsyncClusterPool("host=a,b port=1,2,3 dbname=x")
    cluster: AsyncClusterPool[Any] = AsyncClusterPool(replication.dsns, min_size=1)
    with pytest.raises(PoolClosed, match="not open"):
        await cluster.getconn()
    await cluster.open()
    await cluster.close()
    with pytest.raises(PoolClosed, match="closed"):
        await cluster.getconn()


async def test_put_foreign_connection_fails(
    make_cluster: MakeCluster, replication: Replication
) -> None:
    cluster = await make_cluster()
    conn = await psycopg.AsyncConnection.connect(replication.primary.dsn)
    try:
        with pytest.raises(psycopg.ProgrammingError, match="not lent by it"):
            await cluster.putconn(conn)
        with pytest.raises(psycopg.ProgrammingError, match="not lent by it"):
            await cluster.putconn("a string")  # type: ignore[arg-type]
    finally:
        await conn.close()


async def test_unreachable_host_at_open(
    make_cluster: MakeCluster, replication: Replication
) -> None:
    dead = f"postgresql://u@127.0.0.1:{free_port()}/x"
    cluster = await make_cluster([dead, *replication.dsns])
    async with cluster.connection() as conn:
        assert not await in_recovery(conn)
    async with cluster.connection(read_only=True) as conn:
        assert await in_recovery(conn)
    down = cluster.stats()["hosts"][0]
    assert (down["role"], down["healthy"], down["size"]) == ("unknown", False, 0)
    assert down["error"] and "refused" in down["error"]


async def test_read_only_fallback_does_not_leak_to_writers(
    make_cluster: MakeCluster, replication: Replication
) -> None:
    # One connection per host: the write below reuses the read's connection.
    cluster = await make_cluster(replication.dsns[:1], max_size=1)
    async with cluster.connection(read_only=True) as conn:
        assert await (await conn.execute("SHOW transaction_read_only")).fetchone() == ("on",)
        pid = conn.info.backend_pid
    async with cluster.connection() as conn:
        assert conn.info.backend_pid == pid
        await conn.execute("CREATE TEMP TABLE t (x int)")


async def test_wrong_password_everywhere_fails_fast(replication: Replication) -> None:
    dsns = [dsn.replace(DEFAULT_PASSWORD, "wrong") for dsn in replication.dsns]
    cluster: AsyncClusterPool[Any] = AsyncClusterPool(dsns, min_size=1, timeout=30)
    await cluster.open()
    try:
        with pytest.raises(ConnectFailed, match="password authentication failed") as info:
            await cluster.wait(30)
        assert "wrong" not in str(info.value)
        with pytest.raises(ConnectFailed):
            await cluster.getconn()
    finally:
        await cluster.close()
