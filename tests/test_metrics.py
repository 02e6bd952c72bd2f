"""Metric export: scrape render_prometheus() and OpenTelemetry readers, compare with stats()."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from poolkit import AsyncPool, Pool, PoolTimeout
from poolkit._metrics import render_prometheus
from poolkit._otel import instrument_otel
from tests._helpers import terminate_backends, wait_until

OTEL_NAMES = {
    "db_client_connection_count": "gauge",
    "db_client_connection_max": "gauge",
    "db_client_connection_idle_max": "gauge",
    "db_client_connection_idle_min": "gauge",
    "db_client_connection_pending_requests": "gauge",
    "db_client_connection_timeouts": "counter",
    "db_client_connection_create_time_seconds": "histogram",
    "db_client_connection_wait_time_seconds": "histogram",
    "db_client_connection_use_time_seconds": "histogram",
}
POOLKIT_COUNTERS = {
    "poolkit_borrows": "borrows",
    "poolkit_requests_rejected": "rejected",
    "poolkit_connections_created": "connections_created",
    "poolkit_connections_closed": "connections_closed",
    "poolkit_connections_failed": "connections_failed",
    "poolkit_connections_lost": "connections_lost",
    "poolkit_leaks_detected": "leaks_detected",
    "poolkit_leaks_reclaimed": "leaks_reclaimed",
    "poolkit_validations_run": "validations_run",
    "poolkit_validations_skipped": "validations_skipped",
    "poolkit_validations_failed": "validations_failed",
    "poolkit_resets": "resets",
}


class Scrape:
    """One parsed exposition: samples by (name, labels) and family types by name."""

    def __init__(self, body: bytes) -> None:
        self.text = body.decode()
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(self.text):
            self.types[family.name] = family.type
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def value(self, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        assert key in self.samples, f"no sample {name}{labels} in:\n{self.text}"
        return self.samples[key]

    def buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        out = []
        for (sample, lab), value in self.samples.items():
            d = dict(lab)
            same = set(d) - {"le"} == set(labels) and all(d[k] == v for k, v in labels.items())
            if sample == name + "_bucket" and same:
                out.append((float(d["le"]), value))
        return sorted(out)


def scrape(pools: dict[str, Any]) -> Scrape:
    body, content_type = render_prometheus(pools)
    assert content_type.startswith("text/plain; version=0.0.4")
    return Scrape(body)


def check_histogram(s: Scrape, name: str, count: int, total: float, **labels: str) -> None:
    buckets = s.buckets(name, **labels)
    assert buckets, f"{name}{labels} has no buckets"
    assert buckets[-1][0] == math.inf
    values = [v for _, v in buckets]
    assert values == sorted(values), f"{name} buckets are not cumulative: {buckets}"
    assert s.value(name + "_count", **labels) == count == buckets[-1][1]
    assert s.value(name + "_sum", **labels) == pytest.approx(total)


def assert_matches_stats(s: Scrape, pool: Any, label: str) -> None:
    st = pool.stats()
    assert s.value("db_client_connection_count", pool_name=label, state="idle") == st["idle"]
    assert s.value("db_client_connection_count", pool_name=label, state="used") == st["in_use"]
    assert s.value("db_client_connection_count", pool_name=label, state="parked") == st["parked"]
    assert s.value("db_client_connection_max", pool_name=label) == st["max_size"]
    assert s.value("db_client_connection_idle_max", pool_name=label) == st["max_size"]
    assert s.value("db_client_connection_idle_min", pool_name=label) == st["min_size"]
    assert s.value("db_client_connection_pending_requests", pool_name=label) == st["waiting"]
    assert s.value("poolkit_pool_size", pool_name=label) == st["size"]
    assert s.value("db_client_connection_timeouts_total", pool_name=label) == st["timeouts"]
    for metric, key in POOLKIT_COUNTERS.items():
        assert s.value(metric + "_total", pool_name=label) == st[key], metric
    for metric, key in (
        ("db_client_connection_create_time_seconds", "connect_time"),
        ("db_client_connection_wait_time_seconds", "wait_time"),
        ("db_client_connection_use_time_seconds", "hold_time"),
    ):
        summary = st[key]
        check_histogram(s, metric, summary["count"], summary["sum"], pool_name=label)


def settled(pool: Any) -> bool:
    st = pool.stats()
    return bool(st["connections_created"] - st["connections_closed"] == st["size"] == st["idle"])


def settle(pool: Any) -> None:
    """Wait until every connection being opened is open and idle, so stats() stands still."""
    wait_until(lambda: settled(pool), what="the pool to settle")


async def asettle(pool: Any) -> None:
    for _ in range(1000):
        if settled(pool):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the pool did not settle: {pool.stats()}")


@pytest.fixture
def pool(app_dsn: str) -> Iterator[Pool[Any]]:
    with Pool(app_dsn, min_size=2, max_size=3, name="metrics", timeout=5.0) as p:
        p.wait(timeout=10)
        yield p


def test_names_and_types_follow_otel_conventions(pool: Pool[Any]) -> None:
    with pool.connection() as conn:
        conn.execute("SELECT 1")
    s = scrape({"main": pool})
    for name, kind in OTEL_NAMES.items():
        assert s.types.get(name) == kind, f"{name}: {s.types.get(name)}"
    for name in POOLKIT_COUNTERS:
        assert s.types.get(name) == "counter", name
    assert s.types["poolkit_hold_time_seconds"] == "histogram"
    assert s.types["poolkit_borrow_longest_seconds"] == "gauge"
    # every sample carries the pool label, and nothing else leaks into labels
    for (_, labels), _ in s.samples.items():
        assert dict(labels)["pool_name"] == "main"


def test_values_match_stats_with_borrows_and_a_waiter(pool: Pool[Any]) -> None:
    for i in range(30):
        with pool.connection(tag=f"/route/{i % 3}") as conn:
            conn.execute("SELECT 1")
    held = [pool.getconn() for _ in range(3)]  # the pool is now exhausted
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.getconn(timeout=10)))
    waiter.start()
    try:
        wait_until(lambda: pool.stats()["waiting"] == 1, what="one waiter")
        s = scrape({"main": pool})
        assert s.value("db_client_connection_count", pool_name="main", state="used") == 3
        assert s.value("db_client_connection_pending_requests", pool_name="main") == 1
        assert s.value("poolkit_borrow_longest_seconds", pool_name="main") > 0
        assert_matches_stats(s, pool, "main")
    finally:
        for conn in held:
            pool.putconn(conn)
        waiter.join(10)
    pool.putconn(got[0])
    settle(pool)
    s = scrape({"main": pool})
    assert_matches_stats(s, pool, "main")
    st = pool.stats()
    # the waiter waited: its sample sits above the first bucket, the fast borrows in it
    waits = s.buckets("db_client_connection_wait_time_seconds", pool_name="main")
    assert waits[0][1] < st["wait_time"]["count"]
    assert waits[0][1] >= 30
    for i in range(3):
        route = f"/route/{i}"
        hist = pool.hold_time_by_tag()[route]
        assert hist.count == 10
        check_histogram(s, "poolkit_hold_time_seconds", 10, hist.sum, pool_name="main", route=route)


@pytest.mark.timing
def test_timeouts_and_lost_connections_are_counted(
    pool: Pool[Any], admin_dsn: str, app_name: str
) -> None:
    held = [pool.getconn() for _ in range(3)]
    with pytest.raises(PoolTimeout):
        pool.getconn(timeout=0.05)
    for conn in held:
        pool.putconn(conn)
    s = scrape({"main": pool})
    assert s.value("db_client_connection_timeouts_total", pool_name="main") == 1
    # every backend killed: the next borrows find dead connections and count them lost
    assert terminate_backends(admin_dsn, application_name=app_name)
    for _ in range(3):
        try:
            with pool.connection() as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            pass  # a validation bypass may lend one dead connection once
    wait_until(lambda: pool.stats()["connections_lost"] >= 1, what="a lost connection")

    def settled() -> bool:
        # The pool refills in the background: compare the scrape with stats() once the
        # replacements are in, not while one is landing between the two reads.
        st = pool.stats()
        return bool(st["size"] >= pool.min_size and st["idle"] == st["size"])

    wait_until(settled, what="the pool refilled to min_size")
    s = scrape({"main": pool})
    assert s.value("poolkit_connections_lost_total", pool_name="main") >= 1
    assert_matches_stats(s, pool, "main")


@pytest.mark.timing
def test_leak_counters(app_dsn: str) -> None:
    p: Pool[Any] = Pool(app_dsn, min_size=1, max_size=2, leak_threshold=0.1, open=False)
    p.housekeeping_interval = 0.02
    with p:
        conn = p.getconn()
        wait_until(lambda: p.stats()["leaks_detected"] == 1, what="leak detected")
        s = scrape({"leaky": p})
        assert s.value("poolkit_leaks_detected_total", pool_name="leaky") == 1
        assert s.value("poolkit_borrow_longest_seconds", pool_name="leaky") >= 0.1
        p.putconn(conn)


def test_two_pools_and_no_secret_in_output(pool: Pool[Any], app_dsn: str, dsn: str) -> None:
    with Pool(app_dsn, min_size=1, max_size=1, name="other") as other:
        with other.connection() as conn:
            conn.execute("SELECT 1")
        settle(pool)
        settle(other)
        s = scrape({"main": pool, "replica": other})
        assert_matches_stats(s, pool, "main")
        assert_matches_stats(s, other, "replica")
        password = psycopg.conninfo.conninfo_to_dict(dsn).get("password")
        assert password and str(password) not in s.text
    assert scrape({}).samples == {}


@pytest.mark.asyncio
async def test_async_pool(app_dsn: str) -> None:
    async with AsyncPool(app_dsn, min_size=1, max_size=2, name="a") as apool:

        async def work(i: int) -> None:
            async with apool.connection(tag="/async") as conn:
                await conn.execute("SELECT pg_sleep(0.01)")

        await asyncio.gather(*(work(i) for i in range(10)))
        await asettle(apool)
        s = scrape({"async": apool})
        assert_matches_stats(s, apool, "async")
        assert s.value("poolkit_borrows_total", pool_name="async") == 10
        assert s.value("poolkit_hold_time_seconds_count", pool_name="async", route="/async") == 10


def otel_points(reader: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out[metric.name] = list(metric.data.data_points)
    return out


def test_opentelemetry_instruments(pool: Pool[Any]) -> None:
    sdk = pytest.importorskip("opentelemetry.sdk.metrics", reason="opentelemetry-sdk missing")
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = sdk.MeterProvider(metric_readers=[reader])
    try:
        handle = instrument_otel({"main": pool}, provider.get_meter("test"))
        for _ in range(7):
            with pool.connection(tag="/otel") as conn:
                conn.execute("SELECT 1")
        held = pool.getconn()
        points = otel_points(reader)
        st = pool.stats()
        pool_attr = "db.client.connection.pool.name"
        count = {p.attributes["db.client.connection.state"]: p.value for p in points[
            "db.client.connection.count"]}  # fmt: skip
        assert count == {"idle": st["idle"], "used": st["in_use"], "parked": st["parked"]}
        assert count["used"] == 1
        for name, key in (
            ("db.client.connection.max", "max_size"),
            ("db.client.connection.idle.max", "max_size"),
            ("db.client.connection.idle.min", "min_size"),
            ("db.client.connection.pending_requests", "waiting"),
            ("db.client.connection.timeouts", "timeouts"),
            ("poolkit.borrows", "borrows"),
        ):
            (point,) = points[name]
            assert point.attributes[pool_attr] == "main"
            assert point.value == st[key], name  # type: ignore[literal-required]
        for name, key in (
            ("db.client.connection.create_time", "connect_time"),
            ("db.client.connection.wait_time", "wait_time"),
            ("db.client.connection.use_time", "hold_time"),
        ):
            (point,) = points[name]
            assert point.count == st[key]["count"], name  # type: ignore[literal-required]
        (route,) = points["poolkit.hold_time"]
        assert route.attributes["poolkit.route"] == "/otel" and route.count == 7
        # a second collection adds exactly the new samples (cumulative temporality)
        pool.putconn(held)
        points = otel_points(reader)
        (wait,) = points["db.client.connection.wait_time"]
        assert wait.count == pool.stats()["wait_time"]["count"] == 8
        (use,) = points["db.client.connection.use_time"]
        assert use.count == 8
        assert use.sum == pytest.approx(pool.stats()["hold_time"]["sum"], rel=0.15)
        handle.stop()
        assert "db.client.connection.count" not in otel_points(reader)
    finally:
        provider.shutdown()
