"""A throw-away PostgreSQL server for the test suite and the example apps (no pytest here)."""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import sql

__all__ = [
    "DEFAULT_PASSWORD",
    "EmbeddedPostgres",
    "ExampleServer",
    "ensure_server",
    "find_pg_bindir",
]

# Distinctive on purpose: tests search logs and error messages for it to prove it never leaks.
DEFAULT_PASSWORD = "poolkit-secret-7c1e93d4"

START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
STOP_MODES = ("smart", "fast", "immediate")

_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
_CONF_NAME = "poolkit.conf"
_LOG_NAME = "postgresql.log"
_INCLUDE_LINE = f"include_if_exists = '{_CONF_NAME}'"
# sun_path holds 108 bytes; "/.s.PGSQL.65535" takes 15 of them.
_MAX_SOCKET_DIR_LEN = 90

_NOT_FOUND = """\
No PostgreSQL server binaries found (looked at $POOLKIT_PG_BINDIR, the pgserver package,
`pg_config --bindir` and /usr/lib/postgresql/*/bin). Fix it with one of:
  - pip install -e ".[dev]"      installs pgserver, which bundles PostgreSQL binaries
  - apt-get install postgresql   Debian/Ubuntu server binaries
  - export POOLKIT_PG_BINDIR=/path/to/bin   a directory holding initdb, pg_ctl and postgres
  - export POOLKIT_TEST_DSN=postgresql://...  (tests) or DATABASE_URL=... (example apps)
    to use an existing server instead of starting one"""


def find_pg_bindir() -> Path:
    """Return a directory holding initdb, pg_ctl and postgres, or raise saying how to get one."""
    explicit = os.environ.get("POOLKIT_PG_BINDIR")
    if explicit:
        path = Path(explicit)
        if _has_binaries(path):
            return path
        raise RuntimeError(
            f"POOLKIT_PG_BINDIR={explicit!r} does not contain {', '.join(_REQUIRED_BINARIES)}: "
            "point it at a PostgreSQL bin directory or unset it"
        )
    for finder in (_pgserver_bindir, _pg_config_bindir, _debian_bindir):
        found = finder()
        if found is not None:
            return found
    raise RuntimeError(_NOT_FOUND)


def _has_binaries(path: Path) -> bool:
    return all(os.access(path / name, os.X_OK) for name in _REQUIRED_BINARIES)


def _pgserver_bindir() -> Path | None:
    # find_spec locates the package without importing it: importing pgserver pulls in
    # platformdirs, which warns when XDG_RUNTIME_DIR is unset (root shells, CI).
    try:
        spec = importlib.util.find_spec("pgserver")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "pginstall" / "bin"  # pgserver._commands.POSTGRES_BIN_PATH
        if _has_binaries(path):
            return path
    return None


def _pg_config_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    # pg_config also ships with client-only packages (libpq-dev): check for the server.
    return Path(out) if out and _has_binaries(Path(out)) else None


def _debian_bindir() -> Path | None:
    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    candidates = sorted(_DEBIAN_PG_ROOT.glob("*/bin"), key=version, reverse=True)
    return next((path for path in candidates if _has_binaries(path)), None)


def _service_account() -> pwd.struct_passwd | None:
    """The unprivileged account the server runs as; None when we are not root."""
    if os.geteuid() != 0:
        return None
    # initdb and postgres refuse to run as root.
    for name in ("postgres", "poolkit"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise RuntimeError(
            "running as root, and PostgreSQL refuses to run as root: create an unprivileged "
            "user named 'postgres' or 'poolkit' (useradd is not available here)"
        )
    result = subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", "poolkit"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    try:
        return pwd.getpwnam("poolkit")
    except KeyError:
        raise RuntimeError(
            f"could not create the 'poolkit' user: {result.stderr.strip()}"
        ) from None


def _make_traversable(path: Path) -> None:
    # The server runs as another user than root: it must reach the data dir and the binaries.
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _port_is_free(port: int) -> bool:
    # SO_REUSEADDR like the postmaster: a port in TIME_WAIT is usable, a listening one is not.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class EmbeddedPostgres:
    """A private PostgreSQL cluster in ``data_dir``, listening on 127.0.0.1 only.

    Use it for tests and local demos; it trades durability for speed (fsync off), so never
    point it at data you care about. Every method is idempotent and safe to call at exit.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        user: str = "poolkit",
        password: str | None = DEFAULT_PASSWORD,
        database: str = "poolkit",
        stop_at_exit: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port
        self.user = user
        self.password = password
        self.database = database
        self.stop_at_exit = stop_at_exit
        self.bindir = find_pg_bindir()
        self.log_file = self.data_dir / _LOG_NAME
        self._account = _service_account()
        self._lock = threading.RLock()
        self._atexit_registered = False
        self._socket_dir = self._choose_socket_dir()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<EmbeddedPostgres {self.data_dir} port={self.port} {state}>"

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- connection strings ------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """``postgresql://`` URL over TCP, password included."""
        if self.password is None:
            return self.dsn_without_password
        credentials = f"{quote(self.user, safe='')}:{quote(self.password, safe='')}"
        return f"postgresql://{credentials}@{self._hostport()}/{quote(self.database, safe='')}"

    @property
    def dsn_without_password(self) -> str:
        """The same URL without the password: for logs and error messages."""
        user = quote(self.user, safe="")
        return f"postgresql://{user}@{self._hostport()}/{quote(self.database, safe='')}"

    @property
    def admin_dsn(self) -> str:
        """Superuser URL over the unix socket (trusted, no password) to the same database."""
        return self._socket_dsn(self.database)

    @property
    def socket_dir(self) -> Path:
        return self._socket_dir

    def _require_port(self) -> int:
        if self.port is None:
            raise RuntimeError(f"{self!r} has no port yet: call start() first")
        return self.port

    def _hostport(self) -> str:
        return f"{self.host}:{self._require_port()}"

    def _socket_dsn(self, database: str) -> str:
        host = quote(str(self._socket_dir), safe="")
        return (
            f"postgresql://{quote(self.user, safe='')}@/{quote(database, safe='')}"
            f"?host={host}&port={self._require_port()}"
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def is_running(self) -> bool:
        """True when a live postmaster owns ``data_dir`` (started by us or not)."""
        return self._live_pidfile() is not None

    def start(self) -> None:
        """Initialise the cluster if needed, start it (or adopt a running one), create the db.

        Waits at most START_TIMEOUT seconds; on failure the error carries the server log tail.
        """
        with self._lock:
            deadline = time.monotonic() + START_TIMEOUT
            pidfile = self._live_pidfile()
            fresh = False
            if pidfile is not None:
                self._adopt(pidfile)
            else:
                fresh = self._prepare()
                self._launch_on_a_port()
            self._wait_connectable(self._socket_dsn("postgres"), deadline)
            self._ensure_role_and_database(set_password=not fresh)
            self._wait_connectable(self.dsn, deadline)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server if it runs; ``mode`` is pg_ctl's: smart, fast or immediate."""
        if mode not in STOP_MODES:
            raise ValueError(f"mode={mode!r} is not one of {', '.join(STOP_MODES)}")
        with self._lock:
            if not self.is_running():
                return
            args = [self._bin("pg_ctl"), "stop", "-D", str(self.data_dir), "-m", mode, "-s"]
            args += ["-w", "-t", str(int(STOP_TIMEOUT))]
            code, output = self._run(args, timeout=STOP_TIMEOUT + 10)
            if code != 0 and self.is_running():
                raise RuntimeError(self._failure("pg_ctl stop failed", output))

    def restart(self, mode: str = "fast") -> None:
        """Stop then start on the same port; existing connections are cut."""
        with self._lock:
            self.stop(mode)
            self.start()

    def cleanup(self, *, remove: bool = False) -> None:
        """Stop the server; with ``remove=True`` delete the data dir too."""
        with self._lock:
            try:
                self.stop()
            finally:
                if self._atexit_registered:
                    atexit.unregister(self._stop_at_exit)
                    self._atexit_registered = False
                if remove:
                    shutil.rmtree(self.data_dir, ignore_errors=True)
                    if not self._socket_dir.is_relative_to(self.data_dir):
                        shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _stop_at_exit(self) -> None:
        try:
            self.stop()
        except Exception as exc:  # interpreter shutdown: report, never raise
            print(f"poolkit: could not stop {self!r}: {exc}", file=sys.stderr)

    # -- internals ---------------------------------------------------------------------------

    def _choose_socket_dir(self) -> Path:
        if len(str(self.data_dir)) <= _MAX_SOCKET_DIR_LEN:
            return self.data_dir
        digest = hashlib.sha1(str(self.data_dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"poolkit-pg-{digest}"

    def _bin(self, name: str) -> str:
        return str(self.bindir / name)

    def _run(self, args: list[str], *, timeout: float) -> tuple[int, str]:
        """Run a PostgreSQL binary as the service account; return (exit code, output)."""
        kwargs: dict[str, Any] = {}
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env["LC_ALL"] = "C"
        if self._account is not None:
            kwargs.update(user=self._account.pw_uid, group=self._account.pw_gid, extra_groups=[])
            env.update(HOME=self._account.pw_dir, USER=self._account.pw_name)
        # Output goes to a file, not a pipe: pg_ctl's postmaster could inherit a pipe and
        # keep it open forever, hanging the read.
        with tempfile.TemporaryFile() as out:
            try:
                proc = subprocess.run(
                    args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    env=env, cwd="/", timeout=timeout, check=False, **kwargs,
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    self._failure(f"{Path(args[0]).name} did not finish within {timeout:.0f} s", "")
                ) from None
            out.seek(0)
            return proc.returncode, out.read().decode(errors="replace")

    def _own(self, path: Path) -> None:
        if self._account is not None:
            os.chown(path, self._account.pw_uid, self._account.pw_gid)

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        self._own(path)

    def _prepare(self) -> bool:
        """Make the data dir ready to start; return True when initdb ran just now."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._account is not None:
            self._own(self.data_dir)
            self.data_dir.chmod(0o700)
            _make_traversable(self.data_dir.parent)
            _make_traversable(self.bindir)
        if self._socket_dir != self.data_dir:
            self._socket_dir.mkdir(mode=0o700, exist_ok=True)
            self._own(self._socket_dir)
        fresh = not (self.data_dir / "PG_VERSION").exists()
        if fresh:
            self._initdb()
        else:
            self._check_version()
        return fresh

    def _launch_on_a_port(self) -> None:
        if self.port is not None:  # given, or kept from an earlier start: DSNs depend on it
            self._write_config()
            self._launch()
            return
        for attempt in range(3):
            saved = self._saved_port()
            self.port = saved if saved is not None and _port_is_free(saved) else _free_port()
            self._write_config()
            try:
                self._launch()
                return
            except RuntimeError:
                # Another process may take the port between our probe and the server's bind.
                if attempt == 2 or _port_is_free(self.port):
                    raise

    def _initdb(self) -> None:
        args = [self._bin("initdb"), "-D", str(self.data_dir), "-U", self.user]
        args += ["-E", "UTF8", "--locale=C", "--no-sync", "--auth-local=trust"]
        pwfile: Path | None = None
        try:
            if self.password is not None:
                fd, name = tempfile.mkstemp(prefix=".pwfile-", dir=self.data_dir.parent)
                pwfile = Path(name)
                with os.fdopen(fd, "w") as fh:
                    fh.write(self.password + "\n")
                self._own(pwfile)
                args += ["--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
            else:
                args += ["--auth-host=trust"]
            code, output = self._run(args, timeout=START_TIMEOUT)
        finally:
            if pwfile is not None:
                pwfile.unlink(missing_ok=True)
        if code != 0:
            raise RuntimeError(self._failure(f"initdb failed in {self.data_dir}", output))

    def _check_version(self) -> None:
        data_version = (self.data_dir / "PG_VERSION").read_text().strip()
        code, output = self._run([self._bin("postgres"), "--version"], timeout=30)
        match = re.search(r"(\d+)", output)
        if code == 0 and match and match.group(1) != data_version.split(".")[0]:
            raise RuntimeError(
                f"{self.data_dir} was created by PostgreSQL {data_version} but {self.bindir} "
                f"holds PostgreSQL {match.group(1)}: delete the directory (its data is "
                "disposable) or set POOLKIT_PG_BINDIR to matching binaries"
            )

    def _saved_port(self) -> int | None:
        try:
            text = (self.data_dir / _CONF_NAME).read_text()
        except OSError:
            return None
        match = re.search(r"^port = (\d+)$", text, re.MULTILINE)
        return int(match.group(1)) if match else None

    def _write_config(self) -> None:
        settings: dict[str, str | int] = {
            "listen_addresses": "127.0.0.1",
            "port": self.port or 0,
            "unix_socket_directories": str(self._socket_dir),
            "max_connections": 200,
            # Durability off: the data is disposable and the suite starts and stops a lot.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "password_encryption": "scram-sha-256",
            "logging_collector": "off",
            "log_line_prefix": "%m [%p] %q%u@%d ",
        }
        lines = ["# Written by poolkit's EmbeddedPostgres on every start; edits are lost."]
        for key, value in settings.items():
            rendered = (
                str(value) if isinstance(value, int) else "'{}'".format(value.replace("'", "''"))
            )
            lines.append(f"{key} = {rendered}")
        self._write(self.data_dir / _CONF_NAME, "\n".join(lines) + "\n")
        host_auth = "trust" if self.password is None else "scram-sha-256"
        self._write(
            self.data_dir / "pg_hba.conf",
            "# Written by poolkit's EmbeddedPostgres on every start; edits are lost.\n"
            "local all all trust\n"
            f"host all all 127.0.0.1/32 {host_auth}\n",
        )
        main_conf = self.data_dir / "postgresql.conf"
        if _INCLUDE_LINE not in main_conf.read_text():
            with main_conf.open("a") as fh:
                fh.write(f"\n{_INCLUDE_LINE}\n")

    def _launch(self) -> None:
        args = [self._bin("pg_ctl"), "start", "-D", str(self.data_dir), "-l", str(self.log_file)]
        args += ["-s", "-w", "-t", str(int(START_TIMEOUT))]
        code, output = self._run(args, timeout=START_TIMEOUT + 10)
        if code != 0:
            raise RuntimeError(
                self._failure(f"PostgreSQL did not start on port {self.port}", output)
            )
        if self.stop_at_exit and not self._atexit_registered:
            atexit.register(self._stop_at_exit)
            self._atexit_registered = True

    def _live_pidfile(self) -> list[str] | None:
        """postmaster.pid's lines when its process is alive, else None."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            pid = int(lines[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, owned by someone else
        try:
            # A crash leaves the file behind; its pid may be reused or a zombie by now.
            if b"postgres" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return None
        except OSError:
            pass
        return lines

    def _adopt(self, pidfile: list[str]) -> None:
        # Lines: pid, data dir, start time, port, socket dir, listen address, shmem key, status.
        running_port = int(pidfile[3]) if len(pidfile) > 3 and pidfile[3].isdigit() else None
        if self.port is not None and running_port not in (None, self.port):
            raise RuntimeError(
                f"a server already runs in {self.data_dir} on port {running_port}, not the "
                f"requested {self.port}: stop it or drop the port argument"
            )
        self.port = running_port or self.port
        if len(pidfile) > 4 and pidfile[4]:
            self._socket_dir = Path(pidfile[4])

    def _wait_connectable(self, dsn: str, deadline: float) -> None:
        while True:
            try:
                with psycopg.connect(dsn, connect_timeout=5, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() >= deadline:
                    where = f"{self.dsn_without_password} (socket {self._socket_dir})"
                    raise RuntimeError(
                        self._failure(f"PostgreSQL does not accept connections at {where}", "")
                    ) from exc
            time.sleep(0.05)

    def _ensure_role_and_database(self, *, set_password: bool) -> None:
        with psycopg.connect(self._socket_dsn("postgres"), autocommit=True) as conn:
            if set_password and self.password is not None:
                # The cluster may come from a run with another password: make ours valid.
                conn.execute(
                    sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                        sql.Identifier(self.user), sql.Literal(self.password)
                    )
                )
            found = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
            ).fetchone()
            if found is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server log, for error messages."""
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def _failure(self, what: str, output: str) -> str:
        parts = [what]
        if output.strip():
            parts.append(f"command output:\n{output.strip()}")
        parts.append(f"server log tail ({self.log_file}):\n{self.log_tail()}")
        return "\n".join(parts)


def ensure_server(data_dir: str | os.PathLike[str]) -> str:
    """Return ``$DATABASE_URL`` if set, else the DSN of a server kept running in ``data_dir``.

    The server outlives the process, so another worker (or the next run) reuses it; the
    example commands stop it on exit (see `ExampleServer`). Stop it by hand with
    ``python -m example_apps._embedded_pg stop DATA_DIR``.
    """
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    return ExampleServer(data_dir).dsn


class ExampleServer:
    """The embedded server of an example command: started (or adopted) now, and on exit
    stopped if this command started it, unless `keep`; otherwise `farewell()` says where it
    still runs and the one command that stops it."""

    def __init__(self, data_dir: str | os.PathLike[str], *, keep: bool = False) -> None:
        path = Path(data_dir).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        # Several workers may call this at once: one starts the server, the others adopt it.
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.server = EmbeddedPostgres(path, stop_at_exit=False)
            self.started = not self.server.is_running()
            self.server.start()
        self.dsn = self.server.dsn
        self.stop_command = f"python -m example_apps._embedded_pg stop {_shown(path)}"

    def close(self) -> str:
        """Stop the server if this command started it and may; return what to tell the user."""
        where = f"{_shown(self.server.data_dir)} (port {self.server.port})"
        if not self.started:
            return (
                f"the embedded PostgreSQL in {where} was running before this command and "
                f"keeps running; stop it with: {self.stop_command}"
            )
        if self.keep:
            return (
                f"the embedded PostgreSQL keeps running in {where}; "
                f"stop it with: {self.stop_command}"
            )
        try:
            self.server.stop()
        except Exception as exc:  # the app has already stopped: report, do not hide it
            return (
                f"could not stop the embedded PostgreSQL in {where}: {exc}; "
                f"try: {self.stop_command}"
            )
        return f"stopped the embedded PostgreSQL in {where}"


def _shown(path: Path) -> str:
    """`path` relative to the current directory when it is below it (shorter to read)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _main(argv: list[str]) -> int:
    usage = "usage: python -m example_apps._embedded_pg {start|stop|status} DATA_DIR"
    if len(argv) != 2 or argv[0] not in ("start", "stop", "status"):
        print(usage, file=sys.stderr)
        return 2
    command, data_dir = argv
    if command == "start":
        print(ensure_server(data_dir))
        return 0
    server = EmbeddedPostgres(data_dir, stop_at_exit=False)
    if command == "stop":
        server.stop()
        return 0
    print("running" if server.is_running() else "stopped")
    return 0 if server.is_running() else 3


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
