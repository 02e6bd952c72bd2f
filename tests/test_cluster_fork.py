"""ClusterPool across os.fork(): threads and fork only (asyncio apps fork before their loop)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from poolkit import ClusterPool
from tests._replication import Replication


@pytest.fixture
def cluster(replication: Replication, app_name: str) -> Iterator[ClusterPool[Any]]:
    pool: ClusterPool[Any] = ClusterPool(
        replication.dsns, min_size=1, max_size=4, application_name=app_name,
        topology_interval=0.2,
    )  # fmt: skip
    pool.open()
    pool.wait(15)
    yield pool
    pool.close(timeout=0)


def in_recovery(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    return bool(row and row[0])


def test_forked_child_routes_on_its_own(cluster: ClusterPool[Any]) -> None:
    with cluster.connection(read_only=True) as conn:
        assert in_recovery(conn)
    pid = os.fork()
    if pid == 0:  # the child: its own watchers, its own connections
        code = 1
        try:
            with cluster.connection(timeout=10) as conn:
                write_ok = not in_recovery(conn)
            with cluster.connection(timeout=10, read_only=True) as conn:
                read_ok = in_recovery(conn)
            time.sleep(0.6)  # the child's watchers probe every 0.2 s
            fresh = all((h["checked_ago"] or 9) < 0.5 for h in cluster.stats()["hosts"])
            code = 0 if write_ok and read_ok and fresh else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's probes and connections were not touched by the child.
    with cluster.connection() as conn:
        assert not in_recovery(conn)
    assert all(h["healthy"] for h in cluster.stats()["hosts"])
