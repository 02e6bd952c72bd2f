# WARNING: generated from tests/test_cluster_async.py by scripts/async_to_sync.py: do not edit.
# Edit the async source, then run `python scripts/async_to_sync.py`.
"""ClusterPool on a real primary + streaming standby: failover, lag, routing, faults.

Generated from tests/test_cluster_async.py: edit that file, not this one.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from example_apps._embedded_pg import DEFAULT_PASSWORD
from example_apps._embedded_pg import _free_port as free_port
from poolkit import (
    ClusterPool,
    ConfigError,
    ConnectFailed,
    ConnectionReturned,
    PoolClosed,
    PoolTimeout,
)
from tests._helpers import terminate_backends
from tests._replication import Replication
from tests._tcompat import fixture, sleep, until

MakeCluster = Callable[..., ClusterPool[Any]]


@fixture
def make_cluster(replication: Replication, app_name: str) -> Iterator[MakeCluster]:
    clusters: list[ClusterPool[Any]] = []

    def make(conninfo: Any = None, **kw: Any) -> ClusterPool[Any]:
        kw.setdefault("min_size", 1)
        kw.setdefault("max_size", 4)
        kw.setdefault("application_name", app_name)
        cluster: ClusterPool[Any] = ClusterPool(conninfo or replication.dsns, **kw)
        clusters.append(cluster)
        cluster.open()
        cluster.wait(15)
        return cluster

    yield make
    for cluster in clusters:
        cluster.close(timeout=0)


def in_recovery(conn: psycopg.Connection[Any]) -> bool:
    row = (conn.execute("SELECT pg_is_in_recovery()")).fetchone()
    return bool(row and row[0])


def host_stats(cluster: ClusterPool[Any], label: str) -> dict[str, Any]:
    return next(dict(h) for h in cluster.stats()["hosts"] if h["host"] == label)


def test_roles_learned_and_stats(make_cluster: MakeCluster, replication: Replication) -> None:
    cluster = make_cluster()
    stats = cluster.stats()
    assert stats["primary"] == replication.label(replication.primary)
    primary, replica = stats["hosts"]
    assert (primary["role"], primary["healthy"], primary["lag"]) == ("primary", True, None)
    assert (replica["role"], replica["healthy"]) == ("replica", True)
    assert replica["lag"] is not None and replica["lag"] < 5
    assert stats["size"] == primary["size"] + replica["size"] >= 2
    assert stats["in_use"] == 0


def test_wait_covers_a_replica_whose_pool_is_still_starting(
    make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A host counts as reached when its probe answers, a moment before its pool exists
    # (a loaded machine widens that moment; the sleep makes it certain): wait() must not
    # return in between, or the first read-only borrow goes to the primary.
    start_pool = ClusterPool._start_pool

    def slow_start(self: ClusterPool[Any], host: Any) -> None:
        if host.role == "replica":
            sleep(0.5)
        start_pool(self, host)

    monkeypatch.setattr(ClusterPool, "_start_pool", slow_start)
    cluster = make_cluster()
    assert [h["size"] >= 1 for h in cluster.stats()["hosts"]] == [True, True]
    with cluster.connection(read_only=True) as conn:
        assert in_recovery(conn)


def test_multi_host_conninfo(make_cluster: MakeCluster, replication: Replication) -> None:
    # The standby first: order says nothing about roles.
    dsn = replication.multi_host_dsn()
    dsn = dsn.replace(
        f"{replication.primary.port},{replication.standby.port}",
        f"{replication.standby.port},{replication.primary.port}",
    )
    cluster = make_cluster(dsn)
    assert [h["role"] for h in cluster.stats()["hosts"]] == ["replica", "primary"]
    with cluster.connection() as conn:
        assert not in_recovery(conn)


def test_reads_go_to_replica_in_read_only_transaction(make_cluster: MakeCluster) -> None:
    cluster = make_cluster()
    with cluster.connection(read_only=True) as conn:
        assert in_recovery(conn)
        assert (conn.execute("SHOW transaction_read_only")).fetchone() == ("on",)
    with cluster.connection() as conn:
        assert not in_recovery(conn)
        conn.execute("CREATE TEMP TABLE t (x int)")
    conn = cluster.getconn(read_only=True)
    try:
        assert in_recovery(conn)
    finally:
        cluster.putconn(conn)
    assert cluster.stats()["in_use"] == 0


def test_lagging_replica_falls_back_to_primary(
    make_cluster: MakeCluster, replication: Replication
) -> None:
    cluster = make_cluster(max_replica_lag=0.5, autocommit=True)
    replication.pause_replay()
    replication.write()
    label = replication.label(replication.standby)
    until(lambda: (host_stats(cluster, label)["lag"] or 0) > 0.5, timeout=10, what="lag")
    with cluster.connection(read_only=True) as conn:
        assert not in_recovery(conn)
        # An autocommit read on the primary is still read-only.
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("CREATE TEMP TABLE t (x int)")
    with cluster.connection() as conn:  # the session setting did not leak to writers
        conn.execute("CREATE TEMP TABLE t (x int)")
    assert cluster.stats()["reads_on_primary"] >= 1


def test_lagging_replica_fallback_error(
    make_cluster: MakeCluster, replication: Replication
) -> None:
    cluster = make_cluster(max_replica_lag=0.5, fallback="error")
    replication.pause_replay()
    replication.write()
    label = replication.label(replication.standby)
    until(lambda: (host_stats(cluster, label)["lag"] or 0) > 0.5, timeout=10, what="lag")
    with pytest.raises(PoolTimeout, match="found no replica within max_replica_lag"):
        cluster.getconn(timeout=5, read_only=True)


def test_stopped_replica_reads_move_away(
    make_cluster: MakeCluster, replication: Replication
) -> None:
    cluster = make_cluster()
    with cluster.connection(read_only=True) as conn:
        assert in_recovery(conn)
    replication.stop_standby()
    label = replication.label(replication.standby)
    until(lambda: not host_stats(cluster, label)["healthy"], timeout=5, what="down")
    for _ in range(20):
        with cluster.connection(read_only=True, timeout=5) as conn:
            assert not in_recovery(conn)
    assert host_stats(cluster, label)["size"] == 0


@pytest.mark.slow
def test_failover_writes_follow_promotion(
    make_cluster: MakeCluster, replication: Replication
) -> None:
    cluster = make_cluster()
    held = cluster.getconn()
    held.execute("SELECT 1")
    held.commit()
    new_primary = replication.failover()
    # A write sent to the demoted node fails: it is never acknowledged.
    with pytest.raises(psycopg.OperationalError):
        held.execute("CREATE TABLE never_acked (x int)")
        held.commit()
    cluster.putconn(held)
    with cluster.connection(timeout=5) as conn:
        assert not in_recovery(conn)
        assert conn.info.port == new_primary.port
    stats = cluster.stats()
    assert stats["primary"] == replication.label(new_primary)
    assert stats["failovers"] >= 1
    assert stats["in_use"] == 0


@pytest.mark.slow
def test_switchover_seen_without_waiting_for_the_interval(
    make_cluster: MakeCluster, replication: Replication
) -> None:
    # The writer flip: the old primary stays up read-only, the standby is promoted. A
    # refused write (or a new connection failing its role check) has the old primary
    # probed; with no primary left, the other hosts are probed at once too, not after
    # topology_interval (a minute here).
    cluster = make_cluster(topology_interval=60)
    new_primary = replication.switchover()
    try:
        with cluster.connection() as conn:
            conn.execute("CREATE TEMP TABLE t (x int)")
            assert conn.info.port == new_primary.port  # the flip was seen already
    except psycopg.errors.ReadOnlySqlTransaction:
        pass  # sent to the old primary: refused, never acknowledged
    label = replication.label(new_primary)
    until(lambda: cluster.stats()["primary"] == label, timeout=3, what="the new primary")
    with cluster.connection(timeout=3) as conn:
        assert conn.info.port == new_primary.port
        assert not in_recovery(conn)


def test_primary_turns_read_only(make_cluster: MakeCluster, replication: Replication) -> None:
    cluster = make_cluster()
    held = cluster.getconn()
    replication.set_primary_read_only(True)
    label = replication.label(replication.primary)
    until(lambda: host_stats(cluster, label)["role"] == "replica", timeout=5, what="flip")
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        held.execute("CREATE TABLE flipped (x int)")
    cluster.putconn(held)
    # Lent before the flip: closed once back (the retired pool closes as it drains).
    until(lambda: held.closed, timeout=5, what="the old connection closed")
    with pytest.raises(PoolTimeout, match="found no primary"):
        cluster.getconn(timeout=0.5)
    replication.set_primary_read_only(False)
    with cluster.connection(timeout=5) as conn:
        conn.execute("CREATE TEMP TABLE t (x int)")


def test_write_only_cluster_opens_no_replica_pool(
    make_cluster: MakeCluster, replication: Replication
) -> None:
    cluster = make_cluster(replica_pools=False)
    replica = host_stats(cluster, replication.label(replication.standby))
    assert (replica["role"], replica["healthy"], replica["size"]) == ("replica", True, 0)
    with cluster.connection(read_only=True) as conn:
        assert not in_recovery(conn)  # reads go to the primary
    assert cluster.stats()["reads_on_primary"] == 1


def test_parked_connection_of_an_old_role_is_not_unparked(
    make_cluster: MakeCluster, replication: Replication
) -> None:
    # Django's CONN_MAX_AGE: a connection kept by its thread between requests.
    cluster = make_cluster()
    conn = cluster.getconn()
    assert cluster._park(conn)
    assert cluster.stats()["in_use"] == 0
    assert cluster._unpark(conn)
    assert cluster.stats()["in_use"] == 1
    assert cluster._park(conn)
    replication.set_primary_read_only(True)
    label = replication.label(replication.primary)
    until(lambda: host_stats(cluster, label)["role"] == "replica", timeout=5, what="flip")
    assert not cluster._unpark(conn)
    until(lambda: conn.closed, timeout=5, what="the parked connection closed")
    assert cluster.stats()["in_use"] == 0


def test_parked_connection_taken_by_another_borrower(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(min_size=1, max_size=1)
    conn = cluster.getconn()
    pid = conn.info.backend_pid
    assert cluster._park(conn)
    other = cluster.getconn(timeout=2)  # at max_size: the pool takes the parked one
    assert other is not conn and other.info.backend_pid == pid  # a new handle on it
    assert not cluster._unpark(conn)  # its parker no longer has it
    with pytest.raises(ConnectionReturned):
        conn.execute("SELECT 1")  # nor can it use it any more
    cluster.putconn(other)
    assert cluster.stats()["in_use"] == 0


def test_dropped_borrows_are_reclaimed(make_cluster: MakeCluster) -> None:
    # As with a single pool: a borrow dropped unreturned (or a parked connection whose
    # thread went away) comes back once collected, closed and replaced (its borrower's
    # state is unknown); the cluster's books must not keep it alive.
    cluster = make_cluster(min_size=1, max_size=1, timeout=3)
    conn = cluster.getconn()
    del conn
    gc.collect()
    again = cluster.getconn(timeout=2)
    assert cluster._park(again)
    del again
    gc.collect()
    last = cluster.getconn(timeout=2)
    assert cluster.stats()["in_use"] == 1
    cluster.putconn(last)
    assert cluster.stats()["in_use"] == 0
    assert all(h["size"] <= 1 for h in cluster.stats()["hosts"])  # never above max_size


def test_session_told_read_only_has_the_host_probed(
    make_cluster: MakeCluster, replication: Replication
) -> None:
    # Through getconn()/putconn(), as the integrations borrow: no error reaches the cluster,
    # but the server reported default_transaction_read_only=on to the session.
    cluster = make_cluster(topology_interval=60)
    replication.set_primary_read_only(True)
    try:
        # The reload is signalled to the sessions asynchronously: until a new one sees it.
        until(lambda: replication.primary.query("SHOW default_transaction_read_only")
                    == "on", timeout=5, what="the reload")  # fmt: skip
        conn = cluster.getconn()
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("CREATE TEMP TABLE t (x int)")
        conn.rollback()
        cluster.putconn(conn)
        label = replication.label(replication.primary)
        until(lambda: host_stats(cluster, label)["role"] == "replica", timeout=2,
                    what="the probe after the report")  # fmt: skip
    finally:
        replication.set_primary_read_only(False)


def test_terminated_backends_recover(
    make_cluster: MakeCluster, replication: Replication, app_name: str
) -> None:
    cluster = make_cluster()
    with cluster.connection() as conn:
        conn.execute("SELECT 1")
    terminate_backends(replication.primary.admin_dsn, application_name=app_name)
    terminate_backends(replication.standby.admin_dsn, application_name=app_name)
    with cluster.connection(timeout=5) as conn:
        assert not in_recovery(conn)
    with cluster.connection(timeout=5, read_only=True) as conn:
        assert in_recovery(conn)


def test_round_robin_and_random_policies(make_cluster: MakeCluster) -> None:
    for policy in ("round_robin", "random"):
        cluster = make_cluster(read_policy=policy)
        with cluster.connection(read_only=True) as conn:
            assert in_recovery(conn)


def test_bad_settings_and_closed_errors(replication: Replication) -> None:
    with pytest.raises(ConfigError, match="read_policy"):
        ClusterPool(replication.dsns, read_policy="fastest")
    with pytest.raises(ConfigError, match="fallback"):
        ClusterPool(replication.dsns, fallback="replica")
    with pytest.raises(ConfigError, match="topology_interval"):
        ClusterPool(replication.dsns, topology_interval=0)
    with pytest.raises(ConfigError, match="hosts and 3 ports"):
        ClusterPool("host=a,b port=1,2,3 dbname=x")
    cluster: ClusterPool[Any] = ClusterPool(replication.dsns, min_size=1)
    with pytest.raises(PoolClosed, match="not open"):
        cluster.getconn()
    cluster.open()
    cluster.close()
    with pytest.raises(PoolClosed, match="closed"):
        cluster.getconn()


def test_put_foreign_connection_fails(make_cluster: MakeCluster, replication: Replication) -> None:
    cluster = make_cluster()
    conn = psycopg.Connection.connect(replication.primary.dsn)
    try:
        with pytest.raises(psycopg.ProgrammingError, match="not lent by it"):
            cluster.putconn(conn)
        with pytest.raises(psycopg.ProgrammingError, match="not lent by it"):
            cluster.putconn("a string")  # type: ignore[arg-type]
    finally:
        conn.close()


def test_unreachable_host_at_open(make_cluster: MakeCluster, replication: Replication) -> None:
    dead = f"postgresql://u@127.0.0.1:{free_port()}/x"
    cluster = make_cluster([dead, *replication.dsns])
    with cluster.connection() as conn:
        assert not in_recovery(conn)
    with cluster.connection(read_only=True) as conn:
        assert in_recovery(conn)
    down = cluster.stats()["hosts"][0]
    assert (down["role"], down["healthy"], down["size"]) == ("unknown", False, 0)
    assert down["error"] and "refused" in down["error"]


def test_read_only_fallback_does_not_leak_to_writers(
    make_cluster: MakeCluster, replication: Replication
) -> None:
    # One connection per host: the write below reuses the read's connection.
    cluster = make_cluster(replication.dsns[:1], max_size=1)
    with cluster.connection(read_only=True) as conn:
        assert (conn.execute("SHOW transaction_read_only")).fetchone() == ("on",)
        pid = conn.info.backend_pid
    with cluster.connection() as conn:
        assert conn.info.backend_pid == pid
        conn.execute("CREATE TEMP TABLE t (x int)")


def test_wrong_password_everywhere_fails_fast(replication: Replication) -> None:
    dsns = [dsn.replace(DEFAULT_PASSWORD, "wrong") for dsn in replication.dsns]
    cluster: ClusterPool[Any] = ClusterPool(dsns, min_size=1, timeout=30)
    cluster.open()
    try:
        with pytest.raises(ConnectFailed, match="password authentication failed") as info:
            cluster.wait(30)
        assert "wrong" not in str(info.value)
        with pytest.raises(ConnectFailed):
            cluster.getconn()
    finally:
        cluster.close()
