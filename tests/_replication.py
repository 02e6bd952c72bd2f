"""A primary and a streaming standby on loopback for the cluster tests, with real faults."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from example_apps._embedded_pg import EmbeddedPostgres, _free_port, _make_traversable
from tests._helpers import wait_until

__all__ = ["Replication", "replication"]

_REPLICATION_HBA = "local replication all trust\nhost replication all 127.0.0.1/32 trust\n"


class ReplNode(EmbeddedPostgres):
    """An EmbeddedPostgres that accepts replication connections and may be a standby."""

    def _write_config(self) -> None:
        super()._write_config()
        hba = self.data_dir / "pg_hba.conf"
        self._write(hba, hba.read_text() + _REPLICATION_HBA)
        conf = self.data_dir / "poolkit.conf"
        # Quick status reports keep the primary's view of the standby fresh.
        extra = "wal_receiver_status_interval = 1\nwal_keep_size = '64MB'\n"
        self._write(conf, conf.read_text() + extra)

    def _ensure_role_and_database(self, *, set_password: bool) -> None:
        # A standby is read-only and already holds the primary's roles and database.
        with psycopg.connect(self._socket_dsn("postgres"), autocommit=True) as conn:
            in_recovery = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        if in_recovery and in_recovery[0]:
            return
        super()._ensure_role_and_database(set_password=set_password)

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.admin_dsn, autocommit=True, application_name="pk-repl-admin")

    def query(self, sql: str) -> object:
        with self.admin() as conn:
            row = conn.execute(sql).fetchone()  # type: ignore[call-overload]
        return row[0] if row else None

    def in_recovery(self) -> bool:
        return bool(self.query("SELECT pg_is_in_recovery()"))


class Replication:
    """The shared pair: `primary` and `standby` swap after a promotion, then get repaired."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._n = 0
        self.promote_started = self.promoted_at = 0.0
        self.primary = ReplNode(self._new_dir())
        self.primary.start()
        self.standby = self._clone(self.primary)

    def _new_dir(self) -> Path:
        self._n += 1
        return self.root / f"node{self._n}"

    def _clone(self, source: ReplNode) -> ReplNode:
        data = self._new_dir()
        node = ReplNode(data, port=_free_port())
        data.mkdir(mode=0o700)
        node._own(data)
        if node._account is not None:
            _make_traversable(data.parent)
        args = [
            node._bin("pg_basebackup"), "-D", str(data), "-R", "-X", "stream", "-c", "fast",
            "-h", str(source.socket_dir), "-p", str(source.port), "-U", source.user,
        ]  # fmt: skip
        code, output = node._run(args, timeout=120)
        if code != 0:
            raise RuntimeError(f"pg_basebackup failed:\n{output}")
        (data / "postmaster.pid").unlink(missing_ok=True)
        node.start()
        self._wait_streaming(source)
        return node

    def _wait_streaming(self, primary: ReplNode) -> None:
        streaming = "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
        wait_until(lambda: primary.query(streaming), timeout=30, what="the standby to stream")

    # -- what tests connect to ----------------------------------------------------------

    @property
    def dsns(self) -> list[str]:
        """[primary URL, standby URL], passwords included."""
        return [self.primary.dsn, self.standby.dsn]

    def multi_host_dsn(self, **extra: str) -> str:
        """One key=value conninfo naming both hosts (primary first)."""
        params = conninfo_to_dict(self.primary.dsn)
        params["host"] = "127.0.0.1,127.0.0.1"
        params["port"] = f"{self.primary.port},{self.standby.port}"
        return make_conninfo("", **{**params, **extra})

    def label(self, node: ReplNode) -> str:
        return f"127.0.0.1:{node.port}"

    # -- faults -------------------------------------------------------------------------

    def stop_standby(self, mode: str = "fast") -> None:
        self.standby.stop(mode)

    def failover(self) -> ReplNode:
        """Stop the primary and promote the standby; return the new primary."""
        self.primary.stop("fast")
        self.promote_started = time.monotonic()  # for timings: the primary is down by now
        return self._promote()

    def switchover(self) -> ReplNode:
        """The Aurora-style writer flip: the primary stays up but turns read-only, the
        standby catches up and is promoted; no connection is cut. Returns the new primary."""
        self.set_primary_read_only(True)
        # The reload reaches the sessions asynchronously, and a commit already under way
        # still lands: promote once the standby has all the WAL and none is coming.
        wait_until(
            lambda: self.primary.query("SHOW default_transaction_read_only") == "on",
            timeout=10, what="the primary to turn read-only",
        )  # fmt: skip
        for _ in range(50):
            target = self._wait_caught_up()
            if self.primary.query("SELECT pg_current_wal_lsn()::text") == target:
                break
        self.promote_started = time.monotonic()
        return self._promote()

    def _promote(self) -> ReplNode:
        code, output = self.standby._run(
            [self.standby._bin("pg_ctl"), "promote", "-D", str(self.standby.data_dir), "-w", "-s"],
            timeout=60,
        )
        if code != 0:
            raise RuntimeError(f"pg_ctl promote failed:\n{output}")
        wait_until(lambda: not self.standby.in_recovery(), timeout=30, what="the promotion")
        self.promoted_at = time.monotonic()
        return self.standby

    def _wait_caught_up(self) -> object:
        """Until the standby replayed the primary's current WAL position; returns it."""
        target = self.primary.query("SELECT pg_current_wal_lsn()::text")
        wait_until(
            lambda: self.standby.query(f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"),
            timeout=30, what="the standby to catch up",
        )  # fmt: skip
        return target

    def pause_replay(self) -> None:
        self.standby.query("SELECT pg_wal_replay_pause()")

    def set_primary_read_only(self, on: bool) -> None:
        """The Aurora writer flip: the primary stays up but refuses writes."""
        with self.primary.admin() as conn:
            if on:
                conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            else:
                conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
            conn.execute("SELECT pg_reload_conf()")

    def write(
        self, sql: str = "CREATE TABLE IF NOT EXISTS pk_lag (x int); INSERT INTO pk_lag VALUES (1)"
    ) -> None:
        """Make WAL on the primary (lag only shows when there is something to replay)."""
        with self.primary.admin() as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    # -- repair -------------------------------------------------------------------------

    def repair(self) -> None:
        """Back to a running primary with a streaming, replaying, caught-up standby."""
        if self.primary.is_running() and self.primary.in_recovery():
            raise RuntimeError("the primary is in recovery: the fixture lost track")
        if self.standby.is_running() and not self.standby.in_recovery():
            # Promoted: the old primary is history, the new one gets a fresh standby.
            old = self.primary
            old.cleanup(remove=True)
            self.primary = self.standby
            self.standby = self._clone(self.primary)
        if not self.primary.is_running():
            self.primary.start()
        if self.primary.query("SHOW default_transaction_read_only") == "on":
            self.set_primary_read_only(False)
            wait_until(
                lambda: self.primary.query("SHOW default_transaction_read_only") == "off",
                timeout=10, what="the primary to be writable",
            )  # fmt: skip
        if not self.standby.is_running():
            self.standby.start()
        if self.standby.query("SELECT pg_is_wal_replay_paused()"):
            self.standby.query("SELECT pg_wal_replay_resume()")
        self._wait_streaming(self.primary)
        self._wait_caught_up()

    def cleanup(self) -> None:
        for node in (self.primary, self.standby):
            with contextlib.suppress(Exception):
                node.cleanup(remove=True)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def _replication_pair() -> Iterator[Replication]:
    root = Path(tempfile.mkdtemp(prefix="poolkit-repl-"))
    pair: Replication | None = None
    try:
        pair = Replication(root)
    except Exception as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.exit(f"could not start the replication pair:\n{exc}", returncode=1)
    try:
        yield pair
    finally:
        pair.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def replication(_replication_pair: Replication) -> Iterator[Replication]:
    """The shared primary + standby, healthy and caught up at the start of the test."""
    t0 = time.monotonic()
    _replication_pair.repair()
    assert time.monotonic() - t0 < 60
    yield _replication_pair
