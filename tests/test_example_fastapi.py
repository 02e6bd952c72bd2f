"""The FastAPI example app end to end: its one command, real uvicorn, every endpoint."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from example_apps._embedded_pg import EmbeddedPostgres
from tests._helpers import PgServer, backend_count, wait_until

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 90  # a first run on the embedded default includes initdb


class ExampleProcess:
    """`python -m example_apps.fastapi_app --port 0` with its output collected in a thread."""

    def __init__(
        self,
        cwd: Path,
        env: dict[str, str],
        app_name: str = "",
        extra_args: list[str] | None = None,
    ) -> None:
        self.cwd = cwd
        self.embedded = "DATABASE_URL" not in env
        self.app_name = app_name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "example_apps.fastapi_app", "--port", "0", *(extra_args or [])],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def url(self) -> str:
        def printed() -> str | None:
            assert self.proc.poll() is None, f"the example exited:\n{self.output}"
            match = re.search(r"serving on (http://[^\s/]+)", self.output)
            return match.group(1) if match else None

        return str(wait_until(printed, timeout=START_TIMEOUT, what="the example to print its URL"))

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self._reader.join(timeout=5)
            if self.proc.stdout is not None:
                self.proc.stdout.close()


def example_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "DATABASE_URL" and not (k.startswith("POOLKIT_") and k != "POOLKIT_PG_BINDIR")
    }
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


@pytest.fixture
def example(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ExampleProcess]:
    """The example started like the README says, on a fresh embedded server or on `dsn`."""
    mode = request.param
    app_name = f"pk-example-{uuid.uuid4().hex[:8]}"
    if mode == "embedded":
        # A fresh directory: the example must create and start its own server there.
        proc = ExampleProcess(tmp_path, example_env(POOLKIT_APPLICATION_NAME=app_name), app_name)
    else:
        pg: PgServer = request.getfixturevalue("pg_server")
        env = example_env(DATABASE_URL=pg.dsn, POOLKIT_APPLICATION_NAME=app_name)
        proc = ExampleProcess(ROOT, env, app_name)
    try:
        yield proc
    finally:
        proc.stop()
        if mode == "embedded":
            EmbeddedPostgres(tmp_path / ".poolkit" / "pgdata", stop_at_exit=False).cleanup()


def wait_ready(client: httpx.Client, proc: ExampleProcess) -> None:
    def ready() -> bool:
        assert proc.proc.poll() is None, f"the example exited:\n{proc.output}"
        try:
            return client.get("/ready").status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, timeout=START_TIMEOUT, interval=0.05, what="/ready to answer 200")


@pytest.mark.parametrize("example", ["embedded", "dsn"], indirect=True)
def test_example_endpoints_end_to_end(example: ExampleProcess, pg_server: PgServer) -> None:
    base = example.url()
    tag = f"t-{uuid.uuid4().hex[:10]}"
    with httpx.Client(base_url=base, timeout=30) as client:
        wait_ready(client, example)
        assert "database: postgresql://" in example.output
        assert "poolkit-secret" not in example.output  # the password never shows
        # The address it printed opens on the pages to visit, not on a 404.
        index = client.get("/")
        assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
        for page in ("/docs", "/_poolkit/", "/ready"):
            assert f'href="{page}"' in index.text, index.text
            assert client.get(page).status_code == 200, page
        if example.embedded:
            assert "using an embedded PostgreSQL in .poolkit/pgdata/" in example.output
            assert (example.cwd / ".poolkit" / "pgdata" / "PG_VERSION").is_file()

        # Create: note, tags and event in one transaction.
        r = client.post("/notes", json={"title": "first", "body": "hello", "tags": [tag, "a"]})
        assert r.status_code == 201, r.text
        note = r.json()
        assert (note["title"], note["body"], note["tags"]) == ("first", "hello", sorted([tag, "a"]))
        note_id = note["id"]

        # Read one, list by tag.
        assert client.get(f"/notes/{note_id}").json() == note
        listed = client.get("/notes", params={"tag": tag}).json()
        assert [n["id"] for n in listed] == [note_id]

        # A bad tag is refused before any SQL runs (422): nothing is written.
        before = client.get("/stats").json()
        r = client.post("/notes", json={"title": "rolled back", "tags": [tag, "Not A Tag"]})
        assert r.status_code == 422 and "Not A Tag" in r.text
        assert client.get("/stats").json() == before
        assert [n["id"] for n in client.get("/notes", params={"tag": tag}).json()] == [note_id]
        assert client.post("/notes", json={"title": ""}).status_code == 422

        # Update: fields and tags.
        r = client.patch(f"/notes/{note_id}", json={"title": "renamed", "tags": [tag]})
        assert r.status_code == 200, r.text
        assert (r.json()["title"], r.json()["body"], r.json()["tags"]) == (
            "renamed",
            "hello",
            [tag],
        )
        assert client.patch("/notes/0", json={"title": "x"}).status_code == 404

        # Export streams every note as NDJSON.
        r = client.get("/notes/export")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        assert any(f'"id":{note_id},' in line for line in r.text.splitlines())

        # The `def` route on the sync pool.
        stats = client.get("/stats").json()
        assert stats["notes"] >= 1 and stats["events"] >= 2

        # Delete.
        assert client.delete(f"/notes/{note_id}").status_code == 204
        assert client.get(f"/notes/{note_id}").status_code == 404
        assert client.delete(f"/notes/{note_id}").status_code == 404

        # Operations: readiness (HEAD too, for probes) and metrics with per-route hold time.
        assert client.get("/ready").json()["status"] == "ready"
        head = client.head("/ready")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-type"] == "application/json"

        # The dashboard (on in the example) has sampled since startup, before any page
        # was opened: its chart is drawn at once.
        def sampled() -> dict[str, Any] | None:
            data: dict[str, Any] = client.get("/_poolkit/data").json()
            return data if len(data["pools"][0]["history"]["t"]) >= 2 else None

        data = wait_until(sampled, timeout=10, what="two history samples")
        assert data["history_interval"] == 1.0 and data["history_window"] == 300.0
        metrics = client.get("/metrics").text
        assert 'poolkit_hold_time_seconds_count{pool_name="default",route="POST /notes"}' in metrics
        assert 'route="GET /stats"' in metrics

    # Ctrl-C (SIGINT) for the embedded run, as a user would; SIGTERM as a supervisor would.
    signum = signal.SIGINT if example.embedded else signal.SIGTERM
    assert example.stop(signum) in (0, -signum), example.output
    assert "Traceback" not in example.output, example.output
    # It printed the pages to open, the dashboard included: the example is the demo.
    assert f"API docs:       {base}/docs" in example.output, example.output
    assert f"pool dashboard: {base}/_poolkit/" in example.output, example.output
    if example.embedded:
        # The server it started is stopped on exit, and it says so.
        data_dir = example.cwd / ".poolkit" / "pgdata"
        assert "stopped the embedded PostgreSQL in .poolkit/pgdata" in example.output
        assert not EmbeddedPostgres(data_dir, stop_at_exit=False).is_running()
    else:
        assert backend_count(pg_server.admin_dsn, example.app_name) == 0


def test_example_keep_db_says_where_it_runs_and_how_to_stop(tmp_path: Path) -> None:
    proc = ExampleProcess(tmp_path, example_env(), extra_args=["--keep-db"])
    data_dir = tmp_path / ".poolkit" / "pgdata"
    try:
        with httpx.Client(base_url=proc.url(), timeout=30) as client:
            wait_ready(client, proc)
        assert proc.stop() in (0, -signal.SIGTERM), proc.output
        server = EmbeddedPostgres(data_dir, stop_at_exit=False)
        assert server.is_running()
        stop = "python -m example_apps._embedded_pg stop .poolkit/pgdata"
        assert "the embedded PostgreSQL keeps running in .poolkit/pgdata (port " in proc.output
        assert f"stop it with: {stop}" in proc.output, proc.output
        # The one command it printed stops it.
        subprocess.run([sys.executable, *stop.split()[1:]], cwd=tmp_path, env=example_env(),
                       check=True, timeout=90)  # fmt: skip
        assert not server.is_running()
    finally:
        proc.stop()
        EmbeddedPostgres(data_dir, stop_at_exit=False).cleanup()


def test_example_rejects_a_bad_setting_at_startup(dsn: str) -> None:
    proc = ExampleProcess(ROOT, example_env(DATABASE_URL=dsn, POOLKIT_MAX_SIZ="3"))
    code = proc.proc.wait(timeout=60)
    proc.stop()
    assert code != 0
    assert "POOLKIT_MAX_SIZ='3': is not a pool setting" in proc.output, proc.output
    assert "did you mean 'POOLKIT_MAX_SIZE'?" in proc.output
    assert "poolkit-secret" not in proc.output


@pytest.mark.parametrize("example", ["dsn"], indirect=True)
def test_example_answers_bad_input_with_422(example: ExampleProcess) -> None:
    """NUL bytes, bad tags and out-of-range numbers are the client's error: 422, never a
    500, and no statement is left failed inside a pipeline (psycopg's "error ignored")."""
    base = example.url()
    with httpx.Client(base_url=base, timeout=30) as client:
        wait_ready(client, example)
        before = client.get("/stats").json()
        bad_notes = [
            {"title": "a\x00b"},
            {"title": "ok", "body": "x\x00"},
            {"title": "ok", "tags": ["a\x00"]},
            {"title": "ok", "tags": ["Bad", "a\x00"]},  # a failed insert, then a failed dump
            {"title": "ok", "tags": ["ok", "Not A Tag", "ok2"]},
        ]
        for body in bad_notes:
            r = client.post("/notes", json=body)
            assert r.status_code == 422, (body, r.status_code, r.text)
        assert client.get("/stats").json() == before  # nothing half-written
        for params in [{"tag": "a\x00"}, {"tag": "Not A Tag"}, {"offset": str(10**30)},
                       {"limit": str(10**30)}]:  # fmt: skip
            r = client.get("/notes", params=params)
            assert r.status_code == 422, (params, r.status_code, r.text)
        assert client.get(f"/notes/{10**30}").status_code == 422
        r = client.post("/notes", json={"title": "ok"})
        assert r.status_code == 201, r.text
        note_id = r.json()["id"]
        assert client.patch(f"/notes/{note_id}", json={"title": "a\x00"}).status_code == 422
        assert client.patch(f"/notes/{note_id}", json={"tags": ["a\x00"]}).status_code == 422
        assert client.delete(f"/notes/{note_id}").status_code == 204
    # Ctrl-C (SIGINT) for the embedded run, as a user would; SIGTERM as a supervisor would.
    signum = signal.SIGINT if example.embedded else signal.SIGTERM
    assert example.stop(signum) in (0, -signum), example.output
    assert "Traceback" not in example.output, example.output
    assert "error ignored" not in example.output, example.output
    assert " 500 " not in example.output, example.output
