"""The database password never shows: logs, errors, stats, metrics, dashboard, CLI, under faults.

The chaos scenarios scan everything the example apps and `poolkit doctor` print while the
faults hit; this file covers what those apps do not expose (the dashboard snapshot, leak
warnings, tracebacks, a wrong password) by driving one pool through the same faults.
"""

from __future__ import annotations

import contextlib
import json
import logging
import traceback
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from poolkit import (
    Pool,
    PoolConfig,
    PoolTimeout,
    dashboard_html,
    dashboard_snapshot,
    render_prometheus,
)
from tests._helpers import terminate_backends, wait_until
from tests._proxy import TcpProxy

from ._harness import find_secret, run_doctor, secret_forms, session_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

WRONG_PASSWORD = "not-the-password-5b9e"


class _Capture(logging.Handler):
    """Every record of every logger, formatted with its traceback, as an operator sees it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextlib.contextmanager
def captured_logs() -> Iterator[_Capture]:
    handler = _Capture()
    root = logging.getLogger()
    loggers = [logging.getLogger(n) for n in ("poolkit", "psycopg")]
    saved = [(lg, lg.level) for lg in (root, *loggers)]
    root.addHandler(handler)
    for lg in (root, *loggers):
        lg.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        for lg, level in saved:
            lg.setLevel(level)


def _error_text(exc: BaseException) -> str:
    return f"{exc}\n{exc!r}\n" + "".join(traceback.format_exception(exc))


def test_pool_surfaces_hide_the_password_through_faults(
    dsn: str, admin_dsn: str, proxy: TcpProxy, db_password: str, app_name: str
) -> None:
    url = make_conninfo(proxy.dsn_for(dsn), application_name=app_name)
    assert db_password in url  # the test is only worth something with the password inside
    texts: list[str] = []
    with captured_logs() as logs:
        pool: Pool[psycopg.Connection[tuple[object, ...]]] = Pool(
            url, min_size=2, max_size=3, timeout=1.0, name="secrets", leak_threshold=0.3,
            leak_capture_stack=True, open=False,
        )  # fmt: skip
        pool.housekeeping_interval = 0.1
        try:
            pool.open(wait=True, timeout=30)

            def surfaces() -> None:
                pools = {"secrets": pool}
                texts.extend([repr(pool), repr(pool.config), str(pool.config), str(pool.stats())])
                texts.extend([str(pool.events()), str(pool.borrowed()), str(pool.get_stats())])
                texts.append(json.dumps(dashboard_snapshot(pools)))
                texts.append(render_prometheus(pools)[0].decode())

            texts.append(dashboard_html())
            surfaces()
            # A leak warning carries stacks (with the borrower's locals nowhere near).
            with pool.connection() as conn:
                conn.execute("SELECT 1")
                wait_until(lambda: pool.stats()["leaks_detected"], timeout=5, what="leak warning")
            # Network cut: borrows fail with a timeout that describes the server. A
            # connection returned under a millisecond before the cut is lent without the
            # liveness peek, so the first query may fail with psycopg's own error instead.
            proxy.stop()
            with pytest.raises(PoolTimeout) as timeout_error:
                for _ in range(5):
                    try:
                        with pool.connection(timeout=1.0) as conn:
                            conn.execute("SELECT 1")
                    except psycopg.OperationalError as query_error:
                        if isinstance(query_error, PoolTimeout):  # a subclass: the goal
                            raise
                        texts.append(_error_text(query_error))
            texts.append(_error_text(timeout_error.value))
            surfaces()
            proxy.start()
            wait_until(lambda: _works(pool), timeout=30, what="pool back after the cut")
            # Backends killed while borrowed: the query fails with psycopg's own error.
            with pytest.raises(psycopg.OperationalError) as lost, pool.connection() as conn:
                terminate_backends(admin_dsn, application_name=app_name)
                conn.execute("SELECT 1")
            texts.append(_error_text(lost.value))
            wait_until(lambda: _works(pool), timeout=30, what="pool back after the kill")
            surfaces()
        finally:
            pool.close(timeout=5)
        # A wrong password: the message must show neither password.
        bad_url = url.replace(quote(db_password, safe=""), WRONG_PASSWORD).replace(
            db_password, WRONG_PASSWORD
        )
        bad: Pool[psycopg.Connection[tuple[object, ...]]] = Pool(
            bad_url, min_size=1, timeout=2, name="wrong", open=False
        )
        with pytest.raises(PoolTimeout) as auth, bad:
            bad.open(wait=True, timeout=2)
        texts.append(_error_text(auth.value))
        # Settings errors quote the value they reject.
        with pytest.raises(ValueError) as config_error:
            PoolConfig(conninfo=dsn.replace("postgresql://", "postgresql+psycopg://"))
        texts.append(_error_text(config_error.value))
    texts.extend(logs.lines)
    corpus = "\n".join(texts)
    (session_dir() / "secrets-in-process.log").write_text(corpus)
    assert "***" in corpus, "nothing masked was captured: the scan would prove nothing"
    for secret in (db_password, WRONG_PASSWORD):
        assert not find_secret(corpus, secret_forms(secret))


def _works(pool: Pool[psycopg.Connection[tuple[object, ...]]]) -> bool:
    try:
        with pool.connection(timeout=1.0) as conn:
            conn.execute("SELECT 1")
    except (PoolTimeout, psycopg.OperationalError):
        return False
    return True


def test_doctor_output_hides_the_password(
    dsn: str, proxy: TcpProxy, db_password: str, tmp_path: Path
) -> None:
    out = tmp_path / "doctor.log"
    url = proxy.dsn_for(dsn)
    assert run_doctor(url, out) in (0, 1)
    assert run_doctor(url, out, "--json") in (0, 1)
    assert run_doctor(url.replace(db_password, WRONG_PASSWORD), out) == 2
    assert run_doctor(url.replace("postgresql://", "postgresql+psycopg://"), out) == 2
    proxy.stop()
    assert run_doctor(url, out) == 2
    text = out.read_text()
    (session_dir() / "secrets-doctor.log").write_text(text)
    assert "***" in text
    for secret in (db_password, WRONG_PASSWORD):
        assert not find_secret(text, secret_forms(secret)), text
