"""Smoke run of bench.http_fastapi: every app serves, every pair is reported; speed not asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._helpers import PgServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_run_serves_every_app_without_errors(pg_server: PgServer) -> None:
    env = {**os.environ, "POOLKIT_BENCH_DSN": pg_server.dsn}
    out = subprocess.run(
        [sys.executable, "-m", "bench.http_fastapi", "--quick"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| `")]
    assert len(rows) == 3, out.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        # Throughput is not asserted: on a shared machine a one-second rep can be empty.
        baseline, poolkit, errors = float(cells[1]), float(cells[2]), int(cells[-1])
        assert baseline >= 0 and poolkit >= 0 and errors == 0, row
    # Every pair started both its servers and was measured.
    assert out.stderr.count(" rep 1: ") == 3, out.stderr[-3000:]
