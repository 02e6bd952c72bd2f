"""Test helpers: polling, backend inspection/termination and server stop/start control."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from example_apps._embedded_pg import EmbeddedPostgres

__all__ = [
    "PgControl",
    "PgServer",
    "backend_count",
    "backend_pids",
    "mask_dsn",
    "terminate_backends",
    "wait_until",
]

T = TypeVar("T")

# Backends the helpers count: real client sessions, never the admin connection asking.
_CLIENT_BACKENDS = "backend_type = 'client backend' AND pid <> pg_backend_pid()"


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10,
    interval: float = 0.01,
    *,
    what: str | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that value.

    Use it instead of sleeping; raises AssertionError after ``timeout`` seconds, naming
    ``what`` (or the predicate) and its last value.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            name = what or getattr(predicate, "__qualname__", repr(predicate))
            raise AssertionError(
                f"timed out after {timeout} s waiting for {name}; last value: {result!r}"
            )
        time.sleep(interval)


def mask_dsn(dsn: str) -> str:
    """``dsn`` as key=value conninfo without its password, for messages."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable dsn>"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)


def backend_pids(admin_dsn: str, application_name: str) -> list[int]:
    """Pids of client backends whose application_name is ``application_name``."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        rows = conn.execute(
            f"SELECT pid FROM pg_stat_activity WHERE {_CLIENT_BACKENDS}"
            " AND application_name = %s ORDER BY pid",
            (application_name,),
        ).fetchall()
    return [pid for (pid,) in rows]


def backend_count(admin_dsn: str, application_name: str) -> int:
    """How many client backends carry ``application_name`` right now."""
    return len(backend_pids(admin_dsn, application_name))


def terminate_backends(
    admin_dsn: str,
    *,
    application_name: str | None = None,
    pids: Iterable[int] | None = None,
) -> list[int]:
    """Terminate client backends by application_name and/or pid; return the pids terminated.

    Waits (up to 5 s each) until the backends are gone, so the next query on their
    connections fails for sure. One filter is required: the server may be shared.
    """
    pid_list = list(pids or [])
    if application_name is None and not pid_list:
        raise ValueError("pass application_name= or pids=: refusing to terminate every backend")
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        # pg_terminate_backend(pid, timeout) waits for the exit; it exists from PostgreSQL 14.
        wait = ", 5000" if conn.info.server_version >= 140000 else ""
        rows = conn.execute(
            f"SELECT pid, pg_terminate_backend(pid{wait}) FROM pg_stat_activity"
            f" WHERE {_CLIENT_BACKENDS} AND (application_name = %s OR pid = ANY(%s))",
            (application_name, pid_list),
        ).fetchall()
    return sorted(pid for pid, done in rows if done)


@dataclass(frozen=True)
class PgServer:
    """The server the session tests against: embedded, or external via POOLKIT_TEST_DSN."""

    dsn: str = field(repr=False)  # holds the password
    admin_dsn: str = field(repr=False)
    embedded: EmbeddedPostgres | None = None

    @property
    def host(self) -> str:
        return str(conninfo_to_dict(self.dsn).get("host") or "")

    @property
    def port(self) -> int:
        return int(conninfo_to_dict(self.dsn).get("port") or 5432)


class PgControl:
    """Stop, start and restart the embedded test server; connections are cut on stop."""

    def __init__(self, server: EmbeddedPostgres) -> None:
        self.server = server

    def __repr__(self) -> str:
        return f"<PgControl {self.server!r}>"

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (pg_ctl mode: smart, fast or immediate); waits until it is down."""
        self.server.stop(mode)

    def start(self) -> None:
        """Start it again on the same port; waits until it accepts connections."""
        self.server.start()

    def restart(self, mode: str = "fast") -> None:
        self.server.restart(mode)

    def is_running(self) -> bool:
        return self.server.is_running()
