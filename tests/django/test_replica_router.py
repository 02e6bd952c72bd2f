"""ReplicaRouter and multi-host HOST against a real primary + streaming standby."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.management import call_command
from django.core.signals import request_finished, request_started
from django.db import connections, transaction
from django.test import override_settings

from poolkit_django.routers import ReplicaRouter
from tests._helpers import wait_until
from tests._replication import Replication
from tests.django._support import extra_database

PRIMARY, REPLICA = "pk_primary", "pk_replica"


def in_recovery(alias: str) -> bool:
    with connections[alias].cursor() as cur:
        cur.execute("SELECT pg_is_in_recovery()")
        return bool(cur.fetchone()[0])


@pytest.fixture
def router(replication: Replication, django_db_blocker: Any) -> Iterator[ReplicaRouter]:
    with contextlib.ExitStack() as stack:
        stack.enter_context(django_db_blocker.unblock())
        stack.enter_context(extra_database(PRIMARY, replication.primary.dsn))
        stack.enter_context(
            extra_database(REPLICA, replication.standby.dsn, TEST={"MIRROR": PRIMARY})
        )
        stack.enter_context(override_settings(POOLKIT_PRIMARY=PRIMARY, POOLKIT_MAX_REPLICA_LAG=0.5))
        router = ReplicaRouter()
        stack.callback(router.close)
        assert router.replicas == [REPLICA]
        # Both probes: the primary's may answer after the replica's (a loaded machine).
        wait_until(lambda: _probed(router.topology()), timeout=10, what="both probes")
        yield router


def _probed(topology: dict[str, dict[str, Any]]) -> bool:
    primary, replica = topology.get(PRIMARY, {}), topology.get(REPLICA, {})
    return primary.get("role") == "primary" and bool(replica.get("ok"))


def test_reads_to_replica_writes_and_after_write_to_primary(router: ReplicaRouter) -> None:
    request_started.send(sender=None)
    assert router.db_for_read(None) == REPLICA
    assert in_recovery(router.db_for_read(None))
    assert router.db_for_write(None) == PRIMARY
    assert not in_recovery(PRIMARY)
    assert router.db_for_read(None) == PRIMARY  # this request wrote: read your writes
    request_finished.send(sender=None)
    assert router.db_for_read(None) == REPLICA


def test_atomic_block_reads_from_primary(router: ReplicaRouter) -> None:
    request_started.send(sender=None)
    with transaction.atomic(using=PRIMARY):
        assert router.db_for_read(None) == PRIMARY
    assert router.db_for_read(None) == REPLICA


def test_lagging_or_stopped_replica_is_skipped(
    router: ReplicaRouter, replication: Replication
) -> None:
    request_started.send(sender=None)
    replication.pause_replay()
    replication.write()
    wait_until(lambda: (router.topology()[REPLICA]["lag"] or 0) > 0.5, timeout=10, what="lag")
    assert router.db_for_read(None) == PRIMARY
    connections[REPLICA].close()
    replication.stop_standby()
    wait_until(lambda: not router.topology()[REPLICA]["healthy"], timeout=10, what="down")
    assert router.db_for_read(None) == PRIMARY


def test_installed_through_database_routers(router: ReplicaRouter) -> None:
    from django.db import router as django_router

    from tests.django.project.testapp.models import Note

    with override_settings(DATABASE_ROUTERS=["poolkit_django.routers.ReplicaRouter"]):
        installed = django_router.routers[0]
        assert isinstance(installed, ReplicaRouter)
        try:
            request_started.send(sender=None)
            wait_until(lambda: django_router.db_for_read(Note) == REPLICA, timeout=10)
            assert django_router.db_for_write(Note) == PRIMARY
            assert django_router.db_for_read(Note) == PRIMARY
            assert not django_router.allow_migrate(REPLICA, "testapp")
        finally:
            installed.close()
            request_finished.send(sender=None)


def test_migrations_only_on_primary(router: ReplicaRouter) -> None:
    assert router.allow_migrate(REPLICA, "testapp") is False
    assert router.allow_migrate(PRIMARY, "testapp") is None


def test_poolkit_status_shows_roles_and_lag(router: ReplicaRouter) -> None:
    out = io.StringIO()
    call_command("poolkit_status", "--json", "--database", PRIMARY, "--database", REPLICA,
                 stdout=out)  # fmt: skip
    report = json.loads(out.getvalue())
    assert report[PRIMARY]["cluster"]["role"] == "primary"
    assert report[REPLICA]["cluster"]["role"] == "replica"
    assert report[REPLICA]["cluster"]["lag"] is not None


@pytest.mark.slow
def test_multi_host_default_follows_the_primary(
    replication: Replication, django_db_blocker: Any
) -> None:
    url = replication.multi_host_dsn()
    with (
        django_db_blocker.unblock(),
        extra_database(
            "pk_multi", url, OPTIONS={"target_session_attrs": "read-write", "pool": {"min_size": 1}}
        ) as db,
    ):
        assert db["HOST"] == "127.0.0.1,127.0.0.1"
        assert not in_recovery("pk_multi")
        connections["pk_multi"].close()  # end of a request: the connection goes back
        new_primary = replication.failover()
        # target_session_attrs is ignored: the alias's ClusterPool routes to the new primary
        # (more in tests/django/test_multi_host.py).
        with connections["pk_multi"].cursor() as cur:
            cur.execute("CREATE TEMP TABLE t (x int)")
            assert connections["pk_multi"].connection.info.port == new_primary.port
