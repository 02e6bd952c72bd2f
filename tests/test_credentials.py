# WARNING: generated from tests/test_credentials_async.py by scripts/async_to_sync.py: do not edit.
# Edit the async source, then run `python scripts/async_to_sync.py`.
"""Callable credentials and rotate(): each new connection asks again (async source of

Generated from tests/test_credentials_async.py: edit that file, not this one.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
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


# -- fail fast on permanent errors the trust suite does not cover -------------------------------


class _TlsYes:
    """A listener that answers an SSLRequest with 'S' and then says nothing: libpq goes on
    to set TLS up, so its own TLS settings are checked (this server has no TLS)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
                conn.recv(8)
                conn.sendall(b"S")
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def tls_yes() -> Iterator[_TlsYes]:
    server = _TlsYes()
    try:
        yield server
    finally:
        server.close()


# name -> (DSN fixture, conninfo change, the message's start (a regex), the fix it names)
PERMANENT: dict[str, tuple[str, dict[str, str], str, str]] = {
    "role_missing": (
        "admin_dsn",  # a unix socket (trust): the server says the role is missing (28000)
        {"user": "pk_no_such_role"},
        r'FATAL: role "pk_no_such_role" does not exist',
        "user name",
    ),
    "unknown_database_over_socket": (
        "admin_dsn",
        {"dbname": "pk_no_such_db"},
        r'FATAL: database "pk_no_such_db" does not exist',
        "dbname",
    ),
    "sslmode_require_without_tls": (
        "dsn",
        {"sslmode": "require"},
        r"server does not support SSL, but SSL was required",
        "sslmode",
    ),
    "verify_full_missing_root_cert": (
        "tls_yes",
        {"sslmode": "verify-full", "sslrootcert": "/pk-nonexistent/root.crt"},
        r'root certificate file "/pk-nonexistent/root.crt" does not exist',
        "sslrootcert",
    ),
}


def _permanent_conninfo(case: str, request: pytest.FixtureRequest) -> str:
    fixture, change, _, _ = PERMANENT[case]
    if fixture == "tls_yes":
        server = request.getfixturevalue("tls_yes")
        base = make_conninfo(request.getfixturevalue("dsn"), port=str(server.port))
    else:
        base = request.getfixturevalue(fixture)
        if fixture == "admin_dsn" and not str(conninfo_to_dict(base).get("host", "")).startswith(
            "/"
        ):
            pytest.skip("needs the admin DSN over a unix socket (trust authentication)")
    return make_conninfo(base, connect_timeout="2", **change)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", list(PERMANENT))
def test_open_fails_fast_leading_with_the_servers_reason(
    case: str, request: pytest.FixtureRequest
) -> None:
    _, _, start, fix = PERMANENT[case]
    pool: Pool[Any] = Pool(_permanent_conninfo(case, request), min_size=1, timeout=60, open=False)
    try:
        t0 = time.monotonic()
        with pytest.raises(ConnectFailed) as info:
            pool.open(wait=True, timeout=20)
        assert time.monotonic() - t0 < 3, "one attempt, not the whole open timeout"
        # A borrower that comes meanwhile fails at once too, not after timeout=60.
        t0 = time.monotonic()
        with pytest.raises(ConnectFailed):
            pool.getconn(timeout=60)
        assert time.monotonic() - t0 < 3
    finally:
        pool.close(timeout=0)
    msg = str(info.value)
    assert re.match(start, msg), msg  # the server's reason first, no libpq address prefix
    assert fix in msg.split("): ", 1)[1], msg  # then the setting to change
    assert "max_size" not in msg and "raise timeout" not in msg, msg


@pytest.mark.timeout(30)
def test_a_fixed_password_is_picked_up_by_the_background_retry(app_dsn: str) -> None:
    """No rotate(): the retry that goes on after ConnectFailed asks the callable again."""
    good = str(conninfo_to_dict(app_dsn)["password"])
    secret = [good + "-wrong"]
    pool: Pool[Any] = Pool(app_dsn, kwargs={"password": lambda: secret[0]}, min_size=1, open=False)
    try:
        with pytest.raises(ConnectFailed, match=r"^FATAL: password authentication failed"):
            pool.open(wait=True, timeout=20)
        secret[0] = good
        until(lambda: pool.stats()["size"] == 1, timeout=15, what="a retried connect")
        with pool.connection(timeout=5) as conn:
            conn.execute("SELECT 1")
    finally:
        pool.close(timeout=0)
