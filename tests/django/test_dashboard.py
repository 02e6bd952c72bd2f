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
