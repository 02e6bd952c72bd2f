"""`poolkit doctor` against the real test server: limits, connections, plans that fit and don't."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from poolkit import Pool
from poolkit._cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = run(capsys, *argv, "--json")
    return code, json.loads(out)


def server_setting(conn: psycopg.Connection[Any], name: str) -> int:
    row = conn.execute("SELECT current_setting(%s)::int", (name,)).fetchone()
    assert row is not None
    return int(row[0])


def password(dsn: str) -> str:
    secret = conninfo_to_dict(dsn).get("password")
    assert secret, "the test server must use a password, or the masking tests prove nothing"
    return str(secret)


def test_report_matches_the_server(
    capsys: pytest.CaptureFixture[str], dsn: str, admin_conn: psycopg.Connection[Any]
) -> None:
    code, out, err = run(capsys, "doctor", dsn, "--hosts", "1", "--processes", "2")
    assert code == 0, err
    max_conn = server_setting(admin_conn, "max_connections")
    version = admin_conn.execute("SHOW server_version").fetchone()
    assert version is not None
    assert f"PostgreSQL {version[0]}" in out
    assert re.search(rf"^limits +max_connections +{max_conn}$", out, re.MULTILINE), out
    assert "OK: fits" in out and "recommend   max_size = " in out
    assert password(dsn) not in out + err
    assert "***" in out


def test_json_limits_connections_and_arithmetic(
    capsys: pytest.CaptureFixture[str],
    dsn: str,
    app_dsn: str,
    app_name: str,
    admin_conn: psycopg.Connection[Any],
) -> None:
    with Pool(app_dsn, min_size=3, max_size=3) as pool:
        pool.wait(timeout=10)
        code, report = run_json(
            capsys, "doctor", dsn, "--hosts", "2", "--processes", "3", "--max-size", "4",
            "--application-name", app_name, "--headroom", "5",
        )  # fmt: skip
    assert code == 0
    lim = report["limits"]
    assert lim["max_connections"] == server_setting(admin_conn, "max_connections")
    assert lim["superuser_reserved_connections"] == server_setting(
        admin_conn, "superuser_reserved_connections"
    )
    if admin_conn.info.server_version >= 160000:
        assert lim["reserved_connections"] == server_setting(admin_conn, "reserved_connections")
        reserved = lim["reserved_connections"]
    else:
        assert lim["reserved_connections"] is None
        reserved = 0
    assert (
        lim["usable"] == lim["max_connections"] - lim["superuser_reserved_connections"] - reserved
    )
    # the pool's three connections show up under its application_name, as the fleet's
    mine = [r for r in report["connections"]["by_application"] if r["application_name"] == app_name]
    assert sum(r["count"] for r in mine) == 3 == report["connections"]["fleet"]
    assert all(r["state"] == "idle" for r in mine)
    assert report["connections"]["others"] == report["connections"]["total"] - 3
    plan = report["plan"]
    assert plan["connections"] == 2 * 3 * 4 == 24
    assert plan["available"] == lim["usable"] - report["connections"]["others"] - 5
    assert plan["fits"] is (plan["available"] >= 24)
    rec = report["recommendation"]
    assert rec["max_size"] == plan["available"] // 6
    assert rec["max_size"] * 6 <= plan["available"] < (rec["max_size"] + 1) * 6
    t = report["timing"]
    assert t["connect_ms"] > 0 and t["round_trip_ms"] > 0
    assert t["connect_ms"] > t["round_trip_ms"]  # what pooling saves
    assert report["server"]["version_num"] == admin_conn.info.server_version
    assert password(dsn) not in json.dumps(report)


def test_plan_that_does_not_fit(
    capsys: pytest.CaptureFixture[str], dsn: str, admin_conn: psycopg.Connection[Any]
) -> None:
    max_conn = server_setting(admin_conn, "max_connections")
    processes = str(max_conn)  # max_connections processes with 4 connections each
    code, out, _ = run(capsys, "doctor", dsn, "--hosts", "2", "--processes", processes)
    assert code == 1
    assert "PROBLEM: does not fit" in out
    assert "does NOT fit" in out
    assert "PgBouncer" in out  # under 2 connections per process: the fleet needs a bouncer
    code, report = run_json(capsys, "doctor", dsn, "--hosts", "2", "--processes", processes)
    assert code == 1
    assert report["plan"]["fits"] is False and report["plan"]["spare"] < 0
    assert report["recommendation"]["pgbouncer"] is True
    assert report["recommendation"]["max_size"] == 0


def test_a_fit_that_only_fails_by_max_size(capsys: pytest.CaptureFixture[str], dsn: str) -> None:
    _, report = run_json(capsys, "doctor", dsn, "--headroom", "0")
    available = report["plan"]["available"]
    # a few slots of margin: other tests' connections may come and go meanwhile
    code, _ = run_json(capsys, "doctor", dsn, "--headroom", "0", "--max-size", str(available - 5))
    assert code == 0
    code, report = run_json(
        capsys, "doctor", dsn, "--headroom", "0", "--max-size", str(available + 50)
    )
    assert code == 1 and report["recommendation"]["pgbouncer"] is False


def test_url_from_environment(
    capsys: pytest.CaptureFixture[str], dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", dsn)
    code, report = run_json(capsys, "doctor", "--samples", "2")
    assert code == 0 and report["timing"]["connect_samples"] == 2
    monkeypatch.delenv("DATABASE_URL")
    code, _, err = run(capsys, "doctor")
    assert code == 2 and "DATABASE_URL" in err


def test_connection_error_never_shows_the_password(
    capsys: pytest.CaptureFixture[str], dsn: str
) -> None:
    params = conninfo_to_dict(dsn)
    bad = f"postgresql://{params['user']}:{password(dsn)}@127.0.0.1:1/nope?connect_timeout=3"
    code, out, err = run(capsys, "doctor", bad)
    assert code == 2
    assert "cannot use" in err and "***" in err
    assert password(dsn) not in out + err
    wrong = f"postgresql://{params['user']}:not-{password(dsn)}@{params['host']}:{params['port']}/x"
    code, out, err = run(capsys, "doctor", wrong)
    assert code == 2 and password(dsn) not in out + err


def test_console_script_exit_codes(dsn: str) -> None:
    cmd = [sys.executable, "-m", "poolkit._cli", "doctor", dsn, "--json", "--samples", "1"]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["plan"]["fits"] is True
    too_big = subprocess.run(
        [*cmd, "--max-size", "100000"], capture_output=True, text=True, timeout=60, check=False
    )
    assert too_big.returncode == 1
    usage = subprocess.run(
        [sys.executable, "-m", "poolkit._cli", "doctor", dsn, "--hosts", "0"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert usage.returncode == 2 and "--hosts" in usage.stderr
