"""A multi-host HOST on poolkit_django follows the primary across a failover, as ClusterPool."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import request_finished, request_started
from django.db import Error, connections
from django.test import override_settings

import poolkit_django
from poolkit import ClusterPool
from tests._helpers import wait_until
from tests._replication import Replication
from tests.django._support import call_json, call_wsgi, extra_database

ALIAS = "pk_multi"
# The target: a write borrow succeeds within 2 s after the promotion finished.
WRITES_BACK_WITHIN = 2.0


@pytest.fixture
def table(replication: Replication) -> Iterator[None]:
    replication.write("DROP TABLE IF EXISTS pk_mh; CREATE TABLE pk_mh (id int PRIMARY KEY)")
    replication.repair()  # the standby has the table too
    # ... and says so: a standby that missed it would fail the test after the promotion
    # with "relation does not exist", far from the cause.
    wait_until(
        lambda: replication.standby.query("SELECT to_regclass('pk_mh') IS NOT NULL"),
        timeout=30, what="table pk_mh on the standby",
    )  # fmt: skip
    yield


def write(item: int) -> int:
    """One request that inserts `item`; the port of the server that committed it."""
    request_started.send(sender=None)
    try:
        with connections[ALIAS].cursor() as cur:
            cur.execute("INSERT INTO pk_mh VALUES (%s)", [item])
        return int(connections[ALIAS].connection.info.port)
    finally:
        request_finished.send(sender=None)  # Django's end of request: close or park


def rows(node: Any) -> set[int]:
    with psycopg.connect(node.dsn, autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT id FROM pk_mh").fetchall()}


def app_backends(node: Any, app_name: str) -> int:
    return int(node.query(  # type: ignore[call-overload]
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        f" AND application_name = '{app_name}'"
    ))  # fmt: skip


@pytest.mark.slow
@pytest.mark.usefixtures("table")
def test_demoted_primary_is_left_and_parked_connections_not_reused(
    replication: Replication, django_db_blocker: Any, app_name: str
) -> None:
    """The Aurora writer flip: the old primary stays up, read-only, its sessions intact.

    libpq's target_session_attrs only picks the host of new connections: a pooled (or
    parked, CONN_MAX_AGE) connection to the demoted node would keep failing with 25006.
    """
    url = replication.multi_host_dsn()
    old, new = replication.primary, replication.standby
    with (
        django_db_blocker.unblock(),
        extra_database(
            ALIAS, url, pool={"min_size": 2, "max_size": 4, "timeout": 5},
            conn_max_age=60, application_name=app_name,
        ) as db,
    ):  # fmt: skip
        assert db["HOST"] == "127.0.0.1,127.0.0.1"
        assert db["PORT"] == f"{old.port},{new.port}"
        assert write(1) == old.port  # ... and parked with this thread (CONN_MAX_AGE)
        assert connections[ALIAS]._pk_parked
        acked = {1}
        replication.switchover()
        promoted = replication.promoted_at
        item, failures, first_ok = 2, 0, None
        while first_ok is None and time.monotonic() < promoted + 10:
            try:
                port = write(item)
            except Error:
                failures += 1  # a write on the demoted node fails, never acknowledged
                time.sleep(0.02)
            else:
                acked.add(item)
                assert port == new.port
                first_ok = time.monotonic()
            item += 1
        assert first_ok is not None, "no write succeeded within 10 s of the promotion"
        print(f"first write {first_ok - promoted:.2f} s after the promotion, {failures} failed")
        assert first_ok - promoted < WRITES_BACK_WITHIN, (first_ok - promoted, failures)
        for n in range(item, item + 20):
            assert write(n) == new.port
            acked.add(n)
        pool = poolkit_django.get_pool(ALIAS)
        assert isinstance(pool, ClusterPool)
        hosts = {h["host"]: h for h in pool.stats()["hosts"]}
        assert hosts[replication.label(old)]["role"] == "replica"
        assert hosts[replication.label(old)]["size"] == 0
        assert hosts[replication.label(old)]["draining"] == 0
        # Only the monitor's probe is left on the old node.
        wait_until(lambda: app_backends(old, app_name) <= 1, timeout=5, what="old sessions gone")
    assert acked <= rows(new), sorted(acked - rows(new))


@pytest.mark.slow
@pytest.mark.usefixtures("table")
def test_failover_under_writes_loses_no_acknowledged_write(
    replication: Replication, django_db_blocker: Any, app_name: str
) -> None:
    """Stop the primary, promote the standby, with a writer thread running all along."""
    url = replication.multi_host_dsn()
    old, new = replication.primary, replication.standby
    acked: list[tuple[int, float, int]] = []
    errors: list[str] = []
    stop = threading.Event()

    def writer(first: int) -> None:
        item = first
        try:
            while not stop.is_set():
                try:
                    port = write(item)
                except Error as exc:
                    errors.append(type(exc).__name__)
                    time.sleep(0.02)
                else:
                    acked.append((item, time.monotonic(), port))
                item += 2
        finally:
            connections[ALIAS].close()

    with (
        django_db_blocker.unblock(),
        extra_database(
            ALIAS, url, pool={"min_size": 2, "max_size": 4, "timeout": 8},
            application_name=app_name,
        ),
    ):  # fmt: skip
        threads = [threading.Thread(target=writer, args=(i,)) for i in (1, 2)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: len(acked) >= 20, timeout=10, what="writes before the fault")
            replication.failover()
            promoted = replication.promoted_at
            wait_until(
                lambda: any(t > promoted for _, t, _ in acked), timeout=10,
                what="a write after the promotion",
            )  # fmt: skip
            first_ok = min(t for _, t, _ in acked if t > promoted)
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        print(f"first write {first_ok - promoted:.2f} s after the promotion, errors {errors}")
        assert first_ok - promoted < WRITES_BACK_WITHIN, (first_ok - promoted, errors)
        # Every write committed after the promotion ran on the new primary.
        assert {port for _, t, port in acked if t > promoted} == {new.port}
        pool = poolkit_django.get_pool(ALIAS)
        assert pool.stats()["in_use"] == 0
    found = rows(new)
    lost = [item for item, _, _ in acked if item not in found]
    assert lost == [], f"{len(lost)} of {len(acked)} acknowledged writes lost"
    assert old.port not in {port for _, t, port in acked if t > replication.promote_started}


def test_mismatched_host_and_port_lists_are_a_setting_error(django_db_blocker: Any) -> None:
    url = "host=127.0.0.1,127.0.0.1,127.0.0.1 port=1,2 dbname=x user=x"
    with (
        django_db_blocker.unblock(),
        extra_database(ALIAS, url),
        pytest.raises(ImproperlyConfigured, match=r"\['HOST'\].*3 hosts and 2 ports"),
    ):
        connections[ALIAS].ensure_connection()


def test_status_health_and_metrics_show_each_host(
    replication: Replication, django_db_blocker: Any
) -> None:
    from django.core.management import call_command

    with (
        django_db_blocker.unblock(),
        extra_database(ALIAS, replication.multi_host_dsn(), pool={"min_size": 1}),
    ):
        pool = poolkit_django.get_pool(ALIAS)
        assert isinstance(pool, ClusterPool)
        pool.wait(10)  # every host reached once
        out = io.StringIO()
        call_command("poolkit_status", "--database", ALIAS, stdout=out)
        text = out.getvalue()
        assert f"primary: {replication.label(replication.primary)}" in text, text
        assert f"host {replication.label(replication.standby)}: replica (healthy" in text, text
        report = call_json("/poolkit/health")
        assert report["databases"][ALIAS]["status"] == "ok"
        assert report["databases"][ALIAS]["stats"]["primary"] == replication.label(
            replication.primary
        )
        status, _, body = call_wsgi("/poolkit/metrics")
        assert status == 200
        assert f'pool_name="{ALIAS}[{replication.label(replication.primary)}]"' in body.decode()


@pytest.mark.usefixtures("table")
def test_a_read_only_error_has_the_host_probed_at_once(
    replication: Replication, django_db_blocker: Any
) -> None:
    """A write that meets 25006 wakes the monitor (no waiting for topology_interval)."""
    with (
        django_db_blocker.unblock(),
        override_settings(POOLKIT_TOPOLOGY_INTERVAL=60),
        extra_database(ALIAS, replication.multi_host_dsn(), pool={"min_size": 1, "timeout": 5}),
    ):
        assert write(1) == replication.primary.port
        pool = poolkit_django.get_pool(ALIAS)
        assert isinstance(pool, ClusterPool)
        label = replication.label(replication.primary)
        replication.set_primary_read_only(True)
        try:
            wait_until(lambda: replication.primary.query("SHOW default_transaction_read_only")
                       == "on", timeout=5)  # fmt: skip
            with pytest.raises(Error, match="read-only transaction"):
                write(2)  # the pooled session got the reload: refused, never acknowledged
            wait_until(lambda: pool.stats()["primary"] is None, timeout=2, what="the probe")
        finally:
            replication.set_primary_read_only(False)
        # No primary known: probed every 0.1 s, so it is found again as soon as it is one.
        assert write(3) == replication.primary.port
        assert pool.stats()["primary"] == label
    assert rows(replication.primary) >= {1, 3}


def test_replica_router_with_a_multi_host_primary(
    replication: Replication, django_db_blocker: Any
) -> None:
    """The router's monitor lists each server once, and shows the alias's primary host."""
    from poolkit_django.routers import ReplicaRouter

    with (
        django_db_blocker.unblock(),
        extra_database(ALIAS, replication.multi_host_dsn()),
        extra_database("pk_multi_replica", replication.standby.dsn, TEST={"MIRROR": ALIAS}),
        override_settings(POOLKIT_PRIMARY=ALIAS),
    ):
        router = ReplicaRouter()
        try:
            # Each server has its own probe: wait for both (the primary's may come second).
            def probed() -> bool:
                seen = router.topology()
                replica_ok = seen.get("pk_multi_replica", {}).get("ok")
                return bool(replica_ok) and seen.get(ALIAS, {}).get("role") != "unknown"

            wait_until(probed, timeout=10, what="both probes")
            assert router.topology()[ALIAS]["role"] == "primary"
            assert router.db_for_read(None) == "pk_multi_replica"
        finally:
            router.close()
