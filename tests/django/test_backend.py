"""poolkit_django in-process: settings, checks, a borrow per request, 503, views, test cases."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from django.apps import apps
from django.core.checks import run_checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import connection, connections
from django.test import TestCase, TransactionTestCase, override_settings

from poolkit import Pool
from poolkit_django import get_pool, pools
from tests._helpers import wait_until
from tests.django._support import call_json, call_wsgi, extra_database, free_port, scratch_database
from tests.django.project.testapp.models import Note


@pytest.fixture
def db_access(django_db_blocker: Any) -> Iterator[None]:
    with django_db_blocker.unblock():
        yield


@pytest.fixture
def scratch(db_access: None, admin_dsn: str, dsn: str) -> Iterator[str]:
    with scratch_database(admin_dsn, dsn) as url:
        yield url


# -- settings ----------------------------------------------------------------------------

BAD_POOLS = [
    (
        {"max_sise": 5},
        "DATABASES['bad']['OPTIONS']['pool']['max_sise']",
        "did you mean 'max_size'?",
    ),
    ({"min_size": 5, "max_size": 2}, "['pool']['min_size']=5", "raise max_size or lower min_size"),
    (  # a default in the comparison is named under the alias too
        {"max_size": 3},
        "DATABASES['bad']['OPTIONS']['pool']['min_size']=4 (the default)",
        "raise max_size or lower min_size",
    ),
    ({"timeout": "30"}, "['pool']['timeout']='30'", "must be a number of seconds"),
    ({"conninfo": "postgresql://x/y"}, "['pool']['conninfo']", "set NAME, USER, PASSWORD"),
    ({"autocommit": False}, "['pool']['autocommit']", "DATABASES['bad']['AUTOCOMMIT']"),
    ("yes", "DATABASES['bad']['OPTIONS']['pool']='yes'", "must be True, False or a dict"),
]


@pytest.mark.parametrize(("pool", "where", "fix"), BAD_POOLS)
def test_bad_pool_options_name_the_databases_key(dsn: str, pool: Any, where: str, fix: str) -> None:
    with extra_database("bad", dsn, pool=pool):
        with pytest.raises(ImproperlyConfigured) as info:
            connections["bad"].pool  # noqa: B018
        assert where in str(info.value)
        assert fix in str(info.value)
        # ...and at startup, when poolkit_django is in INSTALLED_APPS.
        with pytest.raises(ImproperlyConfigured, match=r"DATABASES\['bad'\]"):
            apps.get_app_config("poolkit_django").ready()


def test_bad_connection_option_names_the_options_key(dsn: str) -> None:
    with extra_database("bad", dsn) as db:
        db["OPTIONS"]["sslmod"] = "disable"
        with pytest.raises(ImproperlyConfigured) as info:
            connections["bad"].pool  # noqa: B018
        with pytest.raises(ImproperlyConfigured) as at_startup:
            apps.get_app_config("poolkit_django").ready()
    for message in (str(info.value), str(at_startup.value)):
        assert "DATABASES['bad']['OPTIONS']['sslmod']" in message
        assert "did you mean 'sslmode'?" in message


def test_health_checks_conflicting_with_validate_off(dsn: str) -> None:
    conflict = r"\['CONN_HEALTH_CHECKS'\]=True conflicts"
    with (
        extra_database("bad", dsn, pool={"validate": False}, CONN_HEALTH_CHECKS=True),
        pytest.raises(ImproperlyConfigured, match=conflict),
    ):
        connections["bad"].pool  # noqa: B018


def test_conn_health_checks_turns_validation_on(dsn: str) -> None:
    with extra_database("hc", dsn, pool={"min_size": 0, "max_size": 1}, CONN_HEALTH_CHECKS=True):
        pool = connections["hc"].pool
        assert pool is not None and pool.config.validate


def test_conn_health_checks_maps_to_the_check_callable(scratch: str) -> None:
    # As Django's own pool (and its test_pooling_health_checks): pool._check is
    # check_connection with CONN_HEALTH_CHECKS, None without; either way the borrow path
    # runs the built-in, deadline-bounded validation, not a callback.
    settings = {"pool": {"min_size": 0, "max_size": 1}}
    with extra_database("hc_off", scratch, **settings, CONN_HEALTH_CHECKS=False):
        pool = connections["hc_off"].pool
        assert pool is not None and pool._check is None
    with extra_database("hc_on", scratch, **settings, CONN_HEALTH_CHECKS=True):
        wrapper = connections["hc_on"]
        pool = wrapper.pool
        assert pool is not None and pool._check is Pool.check_connection
        assert pool._check_fn is None and pool.config.validate  # type: ignore[attr-defined]
        with wrapper.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
        wrapper.close()
        assert pool.stats()["validations_failed"] == 0


def _query_in_helper(alias: str) -> None:
    with connections[alias].cursor() as cur:
        cur.execute("SELECT 1")


@pytest.mark.parametrize("stacks", [False, True])
def test_borrow_site_is_the_calling_function(scratch: str, stacks: bool) -> None:
    """The borrow is attributed to the first function outside Django and poolkit, at the
    query's line, with or without leak_capture_stack (which adds the stack to the leak log)."""
    pool = {"min_size": 0, "max_size": 1, "leak_capture_stack": stacks}
    with extra_database("site", scratch, pool=pool):
        wrapper = connections["site"]
        _query_in_helper("site")
        (info,) = wrapper.pool.borrowed()  # type: ignore[union-attr]
        code = _query_in_helper.__code__
        line = code.co_firstlineno + 1
        assert f"test_backend.py:{line} in _query_in_helper" in info.site
        wrapper.close()


def test_pool_false_is_django_without_a_pool(scratch: str) -> None:
    with extra_database("plain", scratch, pool=False):
        wrapper = connections["plain"]
        assert wrapper.pool is None
        with wrapper.cursor() as cur:
            cur.execute("SELECT 1")
        raw = wrapper.connection
        wrapper.close()
        assert raw.closed
        assert "plain" not in pools()


def test_pooling_is_on_without_a_pool_option(scratch: str) -> None:
    with extra_database("implicit", scratch) as db:
        del db["OPTIONS"]["pool"]
        with connections["implicit"].cursor() as cur:
            cur.execute("SELECT 1")
        assert pools()["implicit"].stats()["in_use"] == 1
        connections["implicit"].close()
        assert pools()["implicit"].stats()["in_use"] == 0


# -- checks and CONN_MAX_AGE ---------------------------------------------------------------


def test_no_check_message_with_the_defaults() -> None:
    assert [m for m in run_checks() if m.id.startswith("poolkit_django")] == []


def test_conn_max_age_is_not_an_error(scratch: str) -> None:
    """Django's native pool raises ImproperlyConfigured ("Pooling doesn't support persistent
    connections") when CONN_MAX_AGE is not 0; poolkit_django gives it a meaning (a thread
    parks its connection between requests, see test_persistent.py) and warns about nothing."""
    pool = {"min_size": 1, "max_size": 1}
    with (
        extra_database("native_age", scratch, engine="native", pool=pool, conn_max_age=600),
        pytest.raises(ImproperlyConfigured, match="doesn't support persistent"),
    ):
        connections["native_age"].pool  # noqa: B018

    with extra_database("aged", scratch, pool=pool, conn_max_age=600):
        assert [m for m in run_checks() if m.id.startswith("poolkit_django")] == []
        backends = {call_json("/pid", db="aged")["backend"] for _ in range(3)}
        assert len(backends) == 1
        connections["aged"].close()
        assert pools()["aged"].stats()["in_use"] == 0


# -- requests ------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_each_request_borrows_and_returns() -> None:
    pool = get_pool("default")
    before = pool.stats()["borrows"]

    status, _, _ = call_wsgi("/notes", method="POST")
    assert status == 201
    assert pool.stats()["in_use"] == 0
    assert call_json("/notes") == {"notes": ["note"]}
    assert call_json("/notes/atomic") == {"count": 3}
    status, _, _ = call_wsgi("/notes/atomic", fail="1")
    assert status == 409
    assert Note.objects.count() == 3  # the failed transaction left nothing behind
    connection.close()

    stats = pool.stats()
    assert stats["in_use"] == 0
    assert stats["borrows"] >= before + 5
    # PoolkitMiddleware tags each borrow with the view: hold time per view.
    assert {"notes", "tests.django.project.views.notes_atomic"} <= set(pool.hold_time_by_tag())


@pytest.mark.parametrize("limit", ["timeout", "max_waiting"])
def test_exhaustion_gives_503_with_retry_after(scratch: str, limit: str) -> None:
    pool = {"min_size": 1, "max_size": 1, "timeout": 0.5}
    if limit == "max_waiting":
        pool.update(timeout=5, max_waiting=1)
    with extra_database("tiny", scratch, pool=pool):
        holders = [
            threading.Thread(target=call_wsgi, args=("/sleep",), kwargs={"s": 1.5, "db": "tiny"})
        ]
        holders[0].start()
        wait_until(lambda: "tiny" in pools() and pools()["tiny"].stats()["in_use"] == 1)
        if limit == "max_waiting":  # a second request waits in line
            holders.append(
                threading.Thread(target=call_wsgi, args=("/pid",), kwargs={"db": "tiny"})
            )
            holders[1].start()
            wait_until(lambda: pools()["tiny"].stats()["waiting"] == 1)
        status, headers, body = call_wsgi("/pid", db="tiny")
        for t in holders:
            t.join()
        assert status == 503
        assert headers["Retry-After"] == "1"
        assert b"retry shortly" in body
        stats = pools()["tiny"].stats()
        assert stats["timeouts" if limit == "timeout" else "rejected"] == 1
        assert stats["in_use"] == 0


# -- operations ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_health_and_metrics_views() -> None:
    health = call_json("/poolkit/health")
    assert health["status"] == "ok"
    default = health["databases"]["default"]
    assert default["status"] == "ok"
    assert default["stats"]["in_use"] == 0
    assert default["stats"]["name"] == "default"
    # HEAD answers like GET (load balancers and probes send it).
    status, headers, _ = call_wsgi("/poolkit/health", method="HEAD")
    assert (status, headers["Content-Type"]) == (200, "application/json")

    call_json("/pid")
    status, headers, body = call_wsgi("/poolkit/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    assert 'db_client_connection_count{pool_name="default",state="used"} 0.0' in text
    assert 'route="tests.django.project.views.pid"' in text


def _sesame(request: Any) -> bool:
    return bool(request.GET.get("token") == "sesame")


def test_health_reports_an_unreachable_database(
    db_access: None, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"postgresql://nobody@127.0.0.1:{free_port()}/nothing"
    pool = {"min_size": 1, "max_size": 1, "timeout": 0.3}
    check = f"{__name__}._sesame"
    with extra_database("dead", dead, pool=pool), extra_database("ok", dsn):
        status, _, body = call_wsgi("/poolkit/health")
        report = json.loads(body)
        assert status == 503
        assert report["status"] == "unavailable"
        assert report["databases"]["dead"]["status"] == "unavailable"
        assert report["databases"]["dead"]["reason"] == "the database cannot be reached"
        assert report["databases"]["ok"]["status"] == "ok"
        # An unauthenticated client learns nothing about hosts, users or code paths...
        assert "error" not in report["databases"]["dead"]
        for secret in (b"nobody", b"127.0.0.1", b"couldn't", b".py"):
            assert secret not in body
        # ...the log has the details...
        assert any("couldn't get a connection" in r.getMessage() for r in caplog.records)
        # ...and so does the body with DEBUG or for a request the dashboard check accepts.
        with override_settings(DEBUG=True):
            debug = json.loads(call_wsgi("/poolkit/health")[2])
        with override_settings(POOLKIT_DASHBOARD_CHECK=check):
            denied = json.loads(call_wsgi("/poolkit/health", token="nope")[2])
            allowed = json.loads(call_wsgi("/poolkit/health", token="sesame")[2])
    assert "error" not in denied["databases"]["dead"]
    for shown in (debug, allowed):
        assert "couldn't get a connection" in shown["databases"]["dead"]["error"]
        assert "error" not in shown["databases"]["ok"]


@pytest.mark.django_db(transaction=True)
def test_status_command() -> None:
    out = io.StringIO()
    call_command("poolkit_status", stdout=out)
    text = out.getvalue()
    assert "default: ok" in text
    assert "pool: size=" in text
    assert "server: max_connections=" in text
    assert "***" in text and "poolkit-secret" not in text

    out = io.StringIO()
    call_command("poolkit_status", "--json", database=["default"], stdout=out)
    report = json.loads(out.getvalue())
    assert report["default"]["status"] == "ok"
    assert report["default"]["server"]["database"].startswith("test_")


def test_get_pool_without_pooling(dsn: str) -> None:
    with (
        extra_database("plain", dsn, pool=False),
        pytest.raises(ImproperlyConfigured, match="False"),
    ):
        get_pool("plain")


def test_pool_is_rebuilt_when_the_time_zone_changes(scratch: str) -> None:
    with extra_database("tz", scratch):
        assert call_json("/session/show", db="tz")["TimeZone"] == "UTC"
        first = pools()["tz"]
        with override_settings(USE_TZ=False, TIME_ZONE="Asia/Tokyo"):
            assert call_json("/session/show", db="tz")["TimeZone"] == "Asia/Tokyo"
            assert pools()["tz"] is not first
            assert first.closed
        assert call_json("/session/show", db="tz")["TimeZone"] == "UTC"


def test_migrations_forward_and_back(scratch: str) -> None:
    with extra_database("mig", scratch):
        call_command("migrate", database="mig", verbosity=0)
        out = io.StringIO()
        call_command("showmigrations", "testapp", database="mig", stdout=out)
        assert "[X] 0001_initial" in out.getvalue()
        call_command("migrate", "testapp", "zero", database="mig", verbosity=0)
        with connections["mig"].cursor() as cur:
            cur.execute("SELECT to_regclass('testapp_note')")
            assert cur.fetchone() == (None,)
        call_command("migrate", database="mig", verbosity=0)
        assert Note.objects.using("mig").count() == 0
        connections["mig"].close()
        assert pools()["mig"].stats()["in_use"] == 0


# -- Django's test cases -------------------------------------------------------------------


class NoteTestCase(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        Note.objects.create(text="fixture")

    def test_sees_class_data(self) -> None:
        self.assertEqual(list(Note.objects.values_list("text", flat=True)), ["fixture"])

    def test_changes_are_rolled_back(self) -> None:
        Note.objects.create(text="x")
        self.assertEqual(Note.objects.count(), 2)

    def test_runs_on_a_pooled_connection_to_the_test_database(self) -> None:
        self.assertIsNotNone(connection._pk_lease)
        self.assertTrue(connection.in_atomic_block)
        with connection.cursor() as cur:
            cur.execute("SELECT current_database()")
            self.assertTrue(cur.fetchone()[0].startswith("test_"))


class NoteTransactionTestCase(TransactionTestCase):
    def test_commit_is_visible_from_another_pooled_connection(self) -> None:
        Note.objects.create(text="committed")
        seen: list[int] = []

        def other_thread() -> None:
            try:
                seen.append(Note.objects.count())
            finally:
                connection.close()

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        self.assertEqual(seen, [1])
        self.assertEqual(get_pool("default").stats()["in_use"], 1)  # this thread's
