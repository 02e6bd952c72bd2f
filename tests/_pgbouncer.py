"""A real PgBouncer (Debian's binary) in transaction mode in front of the test server."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from example_apps._embedded_pg import _service_account
from tests._helpers import PgServer

__all__ = ["PgBouncer", "find_pgbouncer", "pgbouncer", "pgbouncer_dsn"]

START_TIMEOUT = 20.0
# Every client sharing this many server connections is what transaction pooling is for.
DEFAULT_POOL_SIZE = 4
SINGLE_DB = "poolkit_single"  # an alias whose pool has one server connection
_SEARCH = ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer", "/usr/bin/pgbouncer")
_INSTALL_HINT = (
    "install it with `sudo apt-get install pgbouncer`"
    " (or, as root, `bash scripts/setup.sh --system`)"
)


def find_pgbouncer() -> tuple[str | None, str]:
    """The pgbouncer binary ($POOLKIT_PGBOUNCER, PATH, sbin dirs, or a quick apt-get install)
    and, when it is missing, what was tried."""
    explicit = os.environ.get("POOLKIT_PGBOUNCER")
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit, ""
        return None, f"POOLKIT_PGBOUNCER={explicit!r} is not an executable"
    for candidate in (shutil.which("pgbouncer"), *_SEARCH):
        if candidate and os.access(candidate, os.X_OK):
            return candidate, ""
    tried = f"not in PATH nor {', '.join(_SEARCH)}"
    apt = shutil.which("apt-get")
    if os.geteuid() == 0 and apt:
        # Only from the package lists already on the machine: no `apt-get update` here.
        result = subprocess.run(
            [apt, "install", "-y", "-q", "--no-install-recommends", "pgbouncer"],
            capture_output=True, text=True, timeout=300, check=False,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )  # fmt: skip
        for candidate in (shutil.which("pgbouncer"), *_SEARCH):
            if candidate and os.access(candidate, os.X_OK):
                return candidate, ""
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        tried += f"; `apt-get install pgbouncer` failed: {last[0]}"
    return None, tried


def _version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?", out)
    if not m:
        raise RuntimeError(f"cannot read the version of {binary}: {out!r}")
    return tuple(int(g or 0) for g in m.groups())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _quote_userlist(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


@dataclass
class PgBouncer:
    """A running PgBouncer: `dsn` reaches the test database through it."""

    binary: str
    version: tuple[int, ...]
    host: str
    port: int
    user: str
    password: str | None
    dbname: str
    workdir: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def dsn_for(self, dbname: str | None = None, **params: Any) -> str:
        """A URL through PgBouncer, password included (to `dbname`, default the test db)."""
        auth = quote(self.user, safe="")
        if self.password is not None:
            auth += ":" + quote(self.password, safe="")
        url = f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname or self.dbname)}"
        if params:
            url += "?" + "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items())
        return url

    @property
    def dsn(self) -> str:
        return self.dsn_for()

    def admin(self, command: str) -> list[dict[str, Any]]:
        """Run a command on the admin console (SHOW POOLS, SHOW SERVERS...), rows as dicts."""
        with psycopg.connect(
            self.dsn_for("pgbouncer"), autocommit=True, cursor_factory=psycopg.ClientCursor
        ) as conn:
            cur = conn.execute(command)  # the console speaks the simple protocol only
            names = [d.name for d in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def server_connections(self, dbname: str | None = None) -> int:
        """Server connections PgBouncer holds to `dbname` (active, idle, used, tested)."""
        pools = [p for p in self.admin("SHOW POOLS") if p["database"] == (dbname or self.dbname)]
        keys = ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")
        return sum(int(p.get(k) or 0) for p in pools for k in keys)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.workdir / "pgbouncer.log").read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def start(self, server_host: str, server_port: int) -> None:
        account = _service_account()  # None unless root; PgBouncer refuses to run as root
        auth_type = "scram-sha-256" if self.password is not None else "trust"
        prepared = "max_prepared_statements = 0\n" if self.version >= (1, 21) else ""
        backend = f"host={server_host} port={server_port} dbname={self.dbname}"
        (self.workdir / "userlist.txt").write_text(
            f"{_quote_userlist(self.user)} {_quote_userlist(self.password or '')}\n"
        )
        (self.workdir / "pgbouncer.ini").write_text(
            f"""\
[databases]
{self.dbname} = {backend}
{SINGLE_DB} = {backend} pool_size=1

[pgbouncer]
listen_addr = {self.host}
listen_port = {self.port}
unix_socket_dir =
auth_type = {auth_type}
auth_file = {self.workdir / "userlist.txt"}
admin_users = {self.user}
stats_users = {self.user}
pool_mode = transaction
default_pool_size = {DEFAULT_POOL_SIZE}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 1000
server_check_delay = 0
server_lifetime = 3600
server_idle_timeout = 600
{prepared}logfile = {self.workdir / "pgbouncer.log"}
pidfile = {self.workdir / "pgbouncer.pid"}
"""
        )
        kwargs: dict[str, Any] = {}
        if account is not None:
            for path in (self.workdir, *self.workdir.iterdir()):
                os.chown(path, account.pw_uid, account.pw_gid)
            kwargs.update(user=account.pw_uid, group=account.pw_gid, extra_groups=[])
        self.process = subprocess.Popen(
            [self.binary, str(self.workdir / "pgbouncer.ini")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.workdir,
            **kwargs,
        )
        deadline = time.monotonic() + START_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"pgbouncer exited with {self.process.returncode} at startup:\n"
                    f"{self.log_tail()}"
                )
            try:
                with psycopg.connect(self.dsn, connect_timeout=2, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.Error as exc:
                last = exc
                time.sleep(0.1)
        raise RuntimeError(f"pgbouncer did not accept connections: {last}\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="session")
def pgbouncer(pg_server: PgServer) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode on a free loopback port in front of the test server.

    Skipped, with the reason, only when no pgbouncer binary can be found or installed;
    any other problem fails the tests that use it.
    """
    binary, tried = find_pgbouncer()
    if binary is None:
        pytest.skip(f"pgbouncer not available ({tried}): {_INSTALL_HINT}")
    host = pg_server.host
    if not host or host.startswith("/") or "," in host:
        pytest.fail(f"PgBouncer tests need one TCP host; the server DSN has host={host!r}")
    params = conninfo_to_dict(pg_server.dsn)
    user = str(params.get("user") or pwd.getpwuid(os.getuid()).pw_name)
    password = params.get("password")
    workdir = Path(tempfile.mkdtemp(prefix="poolkit-pgbouncer-"))
    workdir.chmod(0o700)
    bouncer = PgBouncer(
        binary=binary,
        version=_version(binary),
        host="127.0.0.1",
        port=_free_port(),
        user=user,
        password=None if password is None else str(password),
        dbname=str(params.get("dbname") or user),
        workdir=workdir,
    )
    try:
        bouncer.start(host, pg_server.port)
        yield bouncer
    finally:
        bouncer.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir)


@pytest.fixture
def pgbouncer_dsn(pgbouncer: PgBouncer, app_name: str) -> str:
    """A URL through PgBouncer carrying this test's application_name."""
    return pgbouncer.dsn_for(application_name=app_name)
