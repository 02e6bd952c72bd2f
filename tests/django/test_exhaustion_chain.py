"""A pool timeout raised while a failed COMMIT is being handled is a 500, not a 503."""

from __future__ import annotations

import django.db
import psycopg

from poolkit import PoolTimeout
from poolkit_django._middleware import exhaustion


def _raise_chain(first: BaseException, then: BaseException) -> BaseException:
    try:
        try:
            raise first
        except BaseException:
            raise then  # noqa: B904 - the implicit __context__ is the point
    except BaseException as exc:
        return exc


def test_plain_exhaustion_is_found() -> None:
    timeout = PoolTimeout("no connection")
    try:
        try:
            raise timeout
        except PoolTimeout as exc:
            raise django.db.OperationalError(str(exc)) from exc
    except django.db.OperationalError as wrapped:
        assert exhaustion(wrapped) is timeout


def test_exhaustion_while_handling_a_failed_commit_is_not_503() -> None:
    commit_failed = psycopg.OperationalError("server closed the connection during COMMIT")
    exc = _raise_chain(commit_failed, PoolTimeout("no connection to restore autocommit"))
    assert exhaustion(exc) is None


def test_no_pool_error_is_not_exhaustion() -> None:
    assert exhaustion(psycopg.OperationalError("boom")) is None
    assert exhaustion(None) is None
