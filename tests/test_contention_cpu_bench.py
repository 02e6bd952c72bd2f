"""Smoke run of bench.contention_cpu: every peer measured, the parts add up; speed not asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._helpers import PgServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_one_short_round_reports_every_peer(pg_server: PgServer) -> None:
    env = {**os.environ, "POOLKIT_BENCH_DSN": pg_server.dsn}
    out = subprocess.run(
        [sys.executable, "-m", "bench.contention_cpu", "--rounds", "1", "--duration", "0.5",
         "--threads", "8", "--pool", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {
        cells[0]: [float(c) for c in cells[1:6]]
        for line in out.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| peer")
        and (cells := [c.strip() for c in line.strip("|").split("|")])[0] != "---"
        and not set(cells[0]) <= set("-: ")
    }  # fmt: skip
    assert set(rows) == {"poolkit", "psycopg_pool", "floor"}, out.stdout
    for peer, (borrow, query, ret, other, total) in rows.items():
        assert min(borrow, query, ret, total) > 0, (peer, out.stdout)
        # The parts are the total split: they add up to it (to the printed rounding).
        assert abs(borrow + query + ret + other - total) < 0.5, (peer, out.stdout)
