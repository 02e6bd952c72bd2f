# WARNING: generated from tests/test_credentials_async.py by scripts/async_to_sync.py: do not edit.
# Edit the async source, then run `python scripts/async_to_sync.py`.
"""Callable credentials and rotate(): each new connection asks again (async source of

Generated from tests/test_credentials_async.py: edit that file, not this one.
"""

from __future__ import annotations

from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from poolkit import ConnectFailed, Pool
from tests._helpers import backend_pids
from tests._tcompat import until


def test_callable_password_is_called_per_connection(app_dsn: str, app_name: str) -> None:
    params = conninfo_to_dict(app_dsn)
    password = params.pop("password")
    calls: list[int] = []

    def token() -> str:
        calls.append(1)
        return str(password)

    pool: Pool[Any] = Pool(
        make_conninfo("", **params), kwargs={"password": token}, min_size=2, open=False
    )
    pool.open(wait=True, timeout=30)
    try:
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        assert len(calls) == 2  # one per connection, not per borrow
    finally:
        pool.close()


def test_callable_kwargs_is_called_per_connection(app_dsn: str) -> None:
    calls: list[int] = []

    def kwargs() -> dict[str, Any]:
        calls.append(1)
        return {"application_name": f"pk-kwargs-{len(calls)}"}

    pool: Pool[Any] = Pool(app_dsn, kwargs=kwargs, min_size=2, open=False)
    pool.open(wait=True, timeout=30)
    try:
        names = set()
        with pool.connection() as a, pool.connection() as b:
            for conn in (a, b):
                cur = conn.execute("SHOW application_name")
                names.add((cur.fetchone())[0])
        assert names == {"pk-kwargs-1", "pk-kwargs-2"}
    finally:
        pool.close()


def test_rotate_replaces_every_connection_gracefully(
    app_dsn: str, app_name: str, admin_dsn: str
) -> None:
    generation = [1]
    name = app_name[:40]  # the server keeps 63 bytes of an application_name

    def conninfo() -> str:
        return make_conninfo(app_dsn, application_name=f"{name}-g{generation[0]}")

    pool: Pool[Any] = Pool(conninfo, min_size=2, max_size=2, open=False)
    pool.open(wait=True, timeout=30)
    try:
        old = set(backend_pids(admin_dsn, f"{name}-g1"))
        assert len(old) == 2
        held = pool.getconn()  # lent while rotating: kept until it comes back
        generation[0] = 2
        pool.rotate()
        until(lambda: len(backend_pids(admin_dsn, f"{name}-g2")) == 1, what="idle one replaced")
        cur = held.execute("SELECT 1")  # the borrower sees no error
        assert cur.fetchone() == (1,)
        pool.putconn(held)
        until(lambda: len(backend_pids(admin_dsn, f"{name}-g2")) == 2, what="both replaced")
        assert not backend_pids(admin_dsn, f"{name}-g1")
        with pool.connection() as conn:
            cur = conn.execute("SELECT current_setting('application_name')")
            assert cur.fetchone() == (f"{name}-g2",)
        assert pool.stats()["in_use"] == 0
    finally:
        pool.close()


def test_wrong_password_fails_fast_and_recovers_after_rotation(app_dsn: str) -> None:
    params = conninfo_to_dict(app_dsn)
    good = str(params["password"])
    secret = [good + "-wrong"]
    pool: Pool[Any] = Pool(
        app_dsn, kwargs={"password": lambda: secret[0]}, min_size=1, timeout=60, open=False
    )
    pool.open()
    try:
        with pytest.raises(ConnectFailed) as info:
            pool.getconn()  # fails at once, not after timeout=60
        assert str(info.value).startswith("FATAL: password authentication failed"), info.value
        assert secret[0] not in str(info.value)
        secret[0] = good  # the secret store rotated back
        pool.rotate()
        with pool.connection(timeout=30) as conn:
            conn.execute("SELECT 1")
    finally:
        pool.close()
