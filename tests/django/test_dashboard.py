"""The Django dashboard views: off by default, behind an optional check, never a password."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.http import HttpRequest
from django.test import override_settings
from psycopg.conninfo import conninfo_to_dict

from tests.django._support import call_wsgi


def deny(request: HttpRequest) -> bool:
    return False


@pytest.mark.django_db(transaction=True)
def test_dashboard_is_off_by_default() -> None:
    status, _, _ = call_wsgi("/poolkit/dashboard/")
    assert status == 404
    status, _, _ = call_wsgi("/poolkit/dashboard/data")
    assert status == 404


@pytest.mark.django_db(transaction=True)
def test_dashboard_page_and_data_match_stats(dsn: str) -> None:
    with override_settings(POOLKIT_DASHBOARD=True):
        status, headers, page = call_wsgi("/poolkit/dashboard/")
        assert status == 200
        assert headers["Content-Type"].startswith("text/html")
        call_wsgi("/pid")  # a request that borrows and returns
        status, headers, body = call_wsgi("/poolkit/dashboard/data")
    assert status == 200
    snap: dict[str, Any] = json.loads(body)
    (item,) = [p for p in snap["pools"] if p["key"] == "default"]
    assert item["stats"]["in_use"] == 0
    assert item["stats"]["borrows"] >= 1
    password = str(conninfo_to_dict(dsn)["password"])
    assert password not in body.decode()
    assert password not in page.decode()


@pytest.mark.django_db(transaction=True)
def test_dashboard_check_can_deny() -> None:
    check = f"{__name__}.deny"
    with override_settings(POOLKIT_DASHBOARD=True, POOLKIT_DASHBOARD_CHECK=check):
        status, _, _ = call_wsgi("/poolkit/dashboard/data")
    assert status == 403


def _query_in_thread() -> None:
    from django.db import connection

    try:
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        connection.close()


@pytest.mark.django_db(transaction=True)
def test_helper_thread_borrows_are_listed_under_the_thread_name() -> None:
    """A thread does not inherit the view's tag: its hold time shows as "thread: NAME"
    (Python's counter dropped, so one kind of helper thread is one row in Top routes)."""
    import threading

    from poolkit_django import pools

    for _ in range(2):
        t = threading.Thread(target=_query_in_thread, name="mailer-7")
        t.start()
        t.join(30)
    t = threading.Thread(target=_query_in_thread)
    t.start()
    t.join(30)
    with override_settings(POOLKIT_DASHBOARD=True):
        status, _, body = call_wsgi("/poolkit/dashboard/data")
    assert status == 200
    tags = pools()["default"].hold_time_by_tag()
    assert tags["thread: mailer"].count == 2
    assert tags["thread: _query_in_thread"].count == 1
    (item,) = [p for p in json.loads(body)["pools"] if p["key"] == "default"]
    assert {"thread: mailer", "thread: _query_in_thread"} <= {t["tag"] for t in item["top_tags"]}


@pytest.mark.django_db(transaction=True)
def test_a_renamed_thread_is_tagged_with_its_new_name() -> None:
    """The tag is worked out once per thread name (per request it would cost a regex)."""
    import threading

    from poolkit_django import pools

    def work() -> None:
        _query_in_thread()
        threading.current_thread().name = "reindexer-3"
        _query_in_thread()

    t = threading.Thread(target=work, name="renamer-1")
    t.start()
    t.join(30)
    tags = pools()["default"].hold_time_by_tag()
    assert tags["thread: renamer"].count == 1
    assert tags["thread: reindexer"].count == 1
