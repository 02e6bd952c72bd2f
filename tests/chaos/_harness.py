"""Chaos harness: app servers and load in subprocesses, probes, samplers, a secret scan."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil
import psycopg

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHAOS_DIR = ARTIFACTS / "chaos"

# Every wait here is bounded: a hung app must fail the test, not CI.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
PROBE_TIMEOUT = 5.0


def session_dir() -> Path:
    """This pytest process's artifact directory; those of finished processes are removed.

    Per process because several runs may share a checkout (engineers, CI retries) and must
    not delete or mix each other's logs.
    """
    global _session_dir
    if _session_dir is None:
        CHAOS_DIR.mkdir(parents=True, exist_ok=True)
        for old in CHAOS_DIR.glob("session-*"):
            pid = old.name.removeprefix("session-")
            if pid.isdigit() and not psutil.pid_exists(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        _session_dir = CHAOS_DIR / f"session-{os.getpid()}"
        _session_dir.mkdir(exist_ok=True)
    return _session_dir


_session_dir: Path | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, timeout: float = PROBE_TIMEOUT) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:port/path; status 0 with the error on failure."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    except Exception as exc:
        return 0, f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment for a child: ours without POOLKIT_* (from_env rejects unknown ones)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLKIT_")}
    env.pop("DATABASE_URL", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class AppServer:
    """One web server process (uvicorn, gunicorn) with its output captured to a log file."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.port = int(env["CHAOS_PORT"])
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def start(self, ready_path: str, timeout: float = START_TIMEOUT) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} at startup; log tail:\n"
                    + self.log_tail()
                )
            status, _ = http_get(self.port, ready_path, timeout=2.0)
            if status == 200:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def get(self, path: str, timeout: float = PROBE_TIMEOUT) -> tuple[int, str]:
        return http_get(self.port, path, timeout)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def processes(self) -> list[psutil.Process]:
        """The server process and its children (gunicorn workers)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            parent = psutil.Process(self.proc.pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss(self) -> dict[int, int]:
        """RSS in bytes by pid, for the server and every child."""
        out: dict[int, int] = {}
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                out[p.pid] = p.memory_info().rss
        return out

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM (graceful shutdown, pools drain), then SIGKILL of the group past `timeout`."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        # Workers left behind by a dead master are ours too: the group is this server only.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.returncode = proc.returncode
        return self.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        from poolkit import mask_conninfo

        return mask_conninfo("\n".join(self.log_text().splitlines()[-lines:]))


class LoadGen:
    """A `tests.chaos._load` process; `stop()` (or its duration) ends it and yields the records."""

    def __init__(
        self,
        url: str,
        run: str,
        prefix: str,
        out_dir: Path,
        *,
        json_key: str,
        json_extra: dict[str, Any],
        clients: int,
        think: float,
        duration: float | None = None,
        http_timeout: float = 20.0,
        max_seconds: float = 600.0,
        method: str = "POST",
    ) -> None:
        self.out = out_dir / f"load-{prefix}.json"
        self.log = out_dir / f"load-{prefix}.log"
        self.http_timeout = http_timeout
        self.duration = duration
        self.argv = [
            sys.executable, "-m", "tests.chaos._load", "--url", url, "--run", run,
            "--prefix", prefix, "--clients", str(clients), "--think", str(think),
            "--json-key", json_key, "--json-extra", json.dumps(json_extra),
            "--timeout", str(http_timeout),
            "--max-seconds", str(max_seconds), "--out", str(self.out), "--method", method,
        ]  # fmt: skip
        if duration is not None:
            self.argv += ["--duration", str(duration)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LoadGen:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=ROOT, env=clean_env({}), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        return self

    def stop(self) -> dict[str, Any]:
        """Stop the clients after their current request and return the records."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait()

    def wait(self) -> dict[str, Any]:
        assert self.proc is not None
        bound = self.http_timeout + 30.0 + (self.duration or 0.0)
        try:
            self.proc.wait(bound)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise AssertionError(f"load generator did not stop within {bound} s") from None
        if not self.out.exists():
            raise AssertionError(
                f"load generator exited {self.proc.returncode} without results:\n"
                + self.log.read_text(errors="replace")[-3000:]
            )
        result: dict[str, Any] = json.loads(self.out.read_text())
        result["returncode"] = self.proc.returncode
        return result

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class ConnSampler(threading.Thread):
    """Polls pg_stat_activity for backends named `app_name`; keeps the maximum seen."""

    def __init__(self, admin_dsn: str, app_name: str, interval: float = 0.05) -> None:
        super().__init__(daemon=True, name=f"conn-sampler-{app_name}")
        self.admin_dsn = admin_dsn
        self.app_name = app_name
        self.interval = interval
        self.max_seen = 0
        self.max_at = 0.0
        self.samples = 0
        self.last = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self._stop_event.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=2)
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE application_name = %s AND backend_type = 'client backend'",
                    (self.app_name,),
                ).fetchone()
                n = int(row[0]) if row else 0
                self.samples += 1
                self.last = n
                if n > self.max_seen:
                    self.max_seen, self.max_at = n, time.monotonic()
            except psycopg.Error:
                # The server is down (a fault): sample again once it is back.
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
            self._stop_event.wait(self.interval)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self._stop_event.set()
        if self.ident is not None:  # started
            self.join(10)


class Prober(threading.Thread):
    """Fetches the app's health/metrics/stats/dashboard pages all along; keeps every answer."""

    def __init__(
        self, server: AppServer, paths: Iterable[str], log_path: Path, interval: float = 0.5
    ) -> None:
        super().__init__(daemon=True, name=f"prober-{server.name}")
        self.server = server
        self.paths = list(paths)
        self.interval = interval
        self.log_path = log_path
        self.responses = 0
        self.by_status: dict[str, int] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        with self.log_path.open("a") as log:
            while not self._stop_event.is_set():
                for path in self.paths:
                    status, body = self.server.get(path)
                    self.responses += 1
                    key = f"{path} {status}"
                    self.by_status[key] = self.by_status.get(key, 0) + 1
                    log.write(f"=== {time.monotonic():.3f} GET {path} -> {status}\n{body}\n")
                log.flush()
                self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        if self.ident is not None:  # started
            self.join(PROBE_TIMEOUT * len(self.paths) + 5)


def run_doctor(dsn: str, out_path: Path, *args: str) -> int:
    """`poolkit doctor DSN ARGS` as an operator runs it; stdout and stderr appended to out_path."""
    argv = [sys.executable, "-m", "poolkit._cli", "doctor", dsn, "--samples", "2", *args]
    try:
        proc = subprocess.run(
            argv, cwd=ROOT, env=clean_env({}), capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired as exc:
        out, code = f"timed out: {exc.stdout!r} {exc.stderr!r}", -1
    else:
        out, code = proc.stdout + proc.stderr, proc.returncode
    with out_path.open("a") as f:
        f.write(f"=== poolkit doctor <dsn> {' '.join(args)} -> exit {code}\n{out}\n")
    return code


# ---- secrets ------------------------------------------------------------------------------------


def secret_forms(password: str) -> list[str]:
    """The ways a password can be written down: raw, percent-encoded, and in a repr()."""
    forms = {password, quote(password, safe=""), quote(password), repr(password)[1:-1]}
    return sorted(f for f in forms if f)


def find_secret(text: str, forms: Sequence[str]) -> list[str]:
    """Lines of `text` that contain one of `forms` (with the secret itself masked)."""
    hits = []
    for line in text.splitlines():
        if any(f in line for f in forms):
            masked = line
            for f in forms:
                masked = masked.replace(f, "<PASSWORD>")
            hits.append(masked[:300])
    return hits


def scan_dir(directory: Path, forms: Sequence[str]) -> dict[str, list[str]]:
    """Every file under `directory` that mentions the secret, with the offending lines."""
    found: dict[str, list[str]] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            hits = find_secret(path.read_text(errors="replace"), forms)
            if hits:
                found[str(path.relative_to(directory))] = hits[:5]
    return found
