"""Django test helpers: extra aliases, in-process WSGI calls, scratch databases, servers."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psycopg
from django.conf import settings
from django.core.handlers.wsgi import WSGIHandler
from django.db import connections
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import poolkit_django._registry as registry
from tests.django.project.settings import database

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


# -- aliases ---------------------------------------------------------------------------


@contextlib.contextmanager
def extra_database(alias: str, url: str, **options: Any) -> Iterator[dict[str, Any]]:
    """Add ``DATABASES[alias]`` (see project.settings.database) for the duration of a test.

    ``connections.settings`` is the same dict as ``settings.DATABASES``, so the alias works
    everywhere Django looks it up (other threads, management commands, the test runner's
    create_test_db). Connections of this thread and the alias's pool are closed afterwards.
    """
    db = database(url, **options)
    settings.DATABASES[alias] = db
    assert connections.settings[alias] is db
    # Fill in Django's defaults (ATOMIC_REQUESTS, TEST, ...) as for configured aliases.
    connections.configure_settings({"default": settings.DATABASES["default"], alias: db})
    try:
        yield connections.settings[alias]
    finally:
        close_alias(alias)
        settings.DATABASES.pop(alias, None)
        connections.settings.pop(alias, None)


def close_alias(alias: str) -> None:
    with contextlib.suppress(Exception):
        wrapper = connections[alias]
        wrapper.close()
        wrapper.close_pool()  # Django's own backend: close and forget its pool
    registry.retire_alias(alias)
    with contextlib.suppress(AttributeError):
        del connections[alias]


# -- in-process requests ---------------------------------------------------------------

_handler: WSGIHandler | None = None


def call_wsgi(path: str, method: str = "GET", **query: Any) -> tuple[int, dict[str, str], bytes]:
    """One request through Django's real WSGIHandler, signals included (unlike the test
    Client, which keeps connections open between requests)."""
    global _handler
    if _handler is None:
        _handler = WSGIHandler()
    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": urlencode(query),
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": io.StringIO(),
        "wsgi.version": (1, 0),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        seen["status"] = int(status.split()[0])
        seen["headers"] = dict(headers)

    result = _handler(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        result.close()  # sends request_finished: Django returns the connection here
    return seen["status"], seen["headers"], body


def call_json(path: str, **query: Any) -> Any:
    status, _, body = call_wsgi(path, **query)
    assert status == 200, (path, status, body[:2000])
    return json.loads(body)


# -- databases -------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_database(admin_dsn: str, dsn: str, prefix: str = "pk_dj") -> Iterator[str]:
    """A new empty database; yields `dsn` pointing at it, drops it afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(dsn, dbname=name)
    finally:
        drop_database(admin_dsn, name)
        drop_database(admin_dsn, f"test_{name}")


def drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def dbname(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


def run_manage(
    dsn: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> str:
    """``django-admin <args>`` with the test project against `dsn`, in a subprocess."""
    proc = subprocess.run(
        [PYTHON, "-m", "django", *args],
        cwd=ROOT,
        env=server_env(dsn, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"django-admin {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    )
    return proc.stdout + proc.stderr


# -- servers ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(dsn: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PK_", "DJANGO_"))}
    env.update(
        DATABASE_URL=dsn,
        DJANGO_SETTINGS_MODULE="tests.django.project.settings",
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Server:
    """A real HTTP server (gunicorn or uvicorn) in a subprocess, logs in a file."""

    def __init__(
        self, argv: list[str], env: dict[str, str], log: Path, port: int, ready_path: str = "/ping"
    ) -> None:
        self.argv, self.env, self.log, self.port = argv, env, log, port
        self.ready_path = ready_path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        try:
            self.start()
        except BaseException:
            self.stop()  # a server that did not come up must not outlive the test
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        self._log = open(self.log, "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            self.argv, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if self.get(self.ready_path, timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready after {timeout} s:\n{self.logs()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def logs(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-20000:]
        except OSError:
            return "(no log)"

    def get(
        self, path: str, timeout: float = 30, method: str = "GET", body: bytes | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def request_json(self, method: str, path: str, payload: Any) -> tuple[int, Any]:
        status, _, body = self.get(path, method=method, body=json.dumps(payload).encode())
        return status, json.loads(body)

    def json(self, path: str, timeout: float = 30) -> Any:
        status, _, body = self.get(path, timeout=timeout)
        assert status == 200, (path, status, body[:2000], self.logs())
        return json.loads(body)


def no_control_socket() -> list[str]:
    """Recent gunicorn opens a control socket at one fixed path; tests run servers side by side."""
    from gunicorn.config import KNOWN_SETTINGS

    known = any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS)
    return ["--no-control-socket"] if known else []


def gunicorn(
    dsn: str,
    log: Path,
    *,
    workers: int = 1,
    threads: int = 1,
    worker_class: str = "sync",
    app: str = "tests.django.project.wsgi:application",
    extra_args: list[str] | None = None,
    **env: str,
) -> Server:
    port = free_port()
    argv = [
        PYTHON, "-m", "gunicorn", app,
        "--bind", f"127.0.0.1:{port}", "--workers", str(workers), "--threads", str(threads),
        "--worker-class", worker_class, "--timeout", "60", "--graceful-timeout", "10",
        "--log-level", "info", *no_control_socket(), *(extra_args or []),
    ]  # fmt: skip
    return Server(argv, server_env(dsn, **env), log, port)


def uvicorn(
    dsn: str, log: Path, *, app: str = "tests.django.project.asgi:application", **env: str
) -> Server:
    port = free_port()
    argv = [
        PYTHON, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "info", "--lifespan", "off",
    ]  # fmt: skip
    return Server(argv, server_env(dsn, **env), log, port)
