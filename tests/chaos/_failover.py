"""Failover chaos: a real app server on a primary + standby, writers and readers, one fault.

Scenario "promote": the primary stops and the standby is promoted while the load runs.
Scenario "switchover": the primary turns read-only without dropping a session (the Aurora
writer flip) and the standby is promoted. Scenario "replica_down": the standby stops.
Writers POST unique ids through the primary, readers GET through a replica; afterwards
every acknowledged id must be in the database.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests._replication import Replication

from ._checks import BODY, STATUS, T0, T1, short
from ._harness import ARTIFACTS, AppServer, ConnSampler, LoadGen, clean_env, free_port, session_dir
from ._scenarios import DJANGO, LOG_CONFIG, db_counts

WRITERS = READERS = 4
THINK_S = 0.02
BASELINE_S = 2.0
AFTER_S = 5.0  # load kept running after the fault
POOL_MAX = 4  # per host (FastAPI) / per alias (Django), per process
POOL_TIMEOUT_S = 5.0  # a write borrow waits this long for a primary: longer than the failover
WRITES_BACK_WITHIN_S = 2.0  # the target, from the end of the promotion
READS_OK_AFTER_S = 1.0  # no read that starts this long after the fault may fail
READY_TIMEOUT_S = 30.0
RESULTS = ARTIFACTS / "chaos-failover.json"
SCENARIOS = ("promote", "switchover", "replica_down")
PROMOTIONS = ("promote", "switchover")
TITLES = {
    "promote": "primary stopped, standby promoted",
    "switchover": "primary turned read-only (sessions kept), standby promoted",
    "replica_down": "replica stopped",
}


@dataclass(frozen=True)
class ClusterApp:
    """How to serve one framework's app on the pair, and what its pools may open per host."""

    name: str
    processes: int  # processes holding pools (gunicorn: the workers and the --preload master)
    argv: Callable[[int], list[str]]
    env: Callable[[Replication, str], dict[str, str]]
    write_path: str
    json_key: str
    json_extra: dict[str, Any]
    count_sql: str
    read_path: str
    pool_path: str
    shutdown_line: str
    # Connections one process may hold on the first primary and on the standby.
    per_process: tuple[int, int]


def _fastapi_env(pair: Replication, app_name: str) -> dict[str, str]:
    pool = {"min_size": 2, "max_size": POOL_MAX, "timeout": POOL_TIMEOUT_S}
    return {
        "CHAOS_CLUSTER_URLS": json.dumps(pair.dsns),
        "CHAOS_APP_NAME": app_name,
        "CHAOS_POOL": json.dumps(pool),
    }


def _django_env(pair: Replication, app_name: str) -> dict[str, str]:
    pool = {"min_size": 2, "max_size": POOL_MAX, "timeout": POOL_TIMEOUT_S}
    return {
        "DATABASE_URL": pair.multi_host_dsn(),  # "default" names both hosts
        "CHAOS_REPLICA_URL": pair.standby.dsn,
        "CHAOS_APP_NAME": app_name,
        "CHAOS_POOL": json.dumps(pool),
        "DJANGO_SETTINGS_MODULE": "tests.chaos.django_app.settings",
        "POOL_MAX_SIZE": str(POOL_MAX),
    }


FASTAPI = ClusterApp(
    name="fastapi",
    processes=1,
    argv=lambda port: [
        *(sys.executable, "-m", "uvicorn", "tests.chaos.fastapi_cluster.app:app"),
        *("--host", "127.0.0.1", "--port", str(port), "--timeout-graceful-shutdown", "20"),
        *("--log-config", str(LOG_CONFIG)),
    ],
    env=_fastapi_env,
    write_path="/items",
    json_key="name",
    json_extra={},
    count_sql="SELECT split_part(name, '/', 2), count(*) FROM chaos_items"
    " WHERE split_part(name, '/', 1) = %s GROUP BY 1",
    read_path="/items",
    pool_path="/chaos/pool",
    shutdown_line="Application shutdown complete.",
    # One pool per host plus the monitor's probe; on the standby the replica pool may
    # still drain while the new primary pool fills.
    per_process=(POOL_MAX + 1, 2 * POOL_MAX + 1),
)

DJANGO_CLUSTER = ClusterApp(
    name="django",
    processes=3,
    argv=DJANGO.argv,
    env=_django_env,
    write_path=DJANGO.write_path,
    json_key=DJANGO.json_key,
    json_extra=DJANGO.json_extra,
    count_sql=DJANGO.count_sql,
    read_path="/chaos/read",
    pool_path="/chaos/pool",
    shutdown_line=DJANGO.shutdown_line,
    # "default" (its pool on the primary only, a probe per host), the router's probe per
    # host, and the "replica" alias's pool on the standby.
    per_process=(POOL_MAX + 2, 2 * POOL_MAX + 2),
)

APPS = {"fastapi": FASTAPI, "django": DJANGO_CLUSTER}


def _wait_ready(server: AppServer, path: str, replica_port: int) -> None:
    """Until a read answers from the replica (the schema replicated, routing on)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        status, body = server.get(path)
        last = f"{status} {body[:300]}"
        if status == 200 and json.loads(body).get("port") == replica_port:
            return
        time.sleep(0.2)
    raise AssertionError(f"{server.name}: reads never reached the replica: {last}")


def _in_use_zero(server: AppServer, path: str, processes: int) -> bool:
    zero = 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status, body = server.get(path)
        if status == 200:
            in_use = sum(int(p["in_use"]) for p in json.loads(body)["pools"].values())
            zero = zero + 1 if in_use == 0 else 0
            if zero >= 10 * processes:
                return True
        time.sleep(0.05)
    return False


def run_failover(
    pair: Replication, app: ClusterApp, scenario: str
) -> tuple[dict[str, Any], list[str]]:
    """One run; returns the row for the results table and the broken promises."""
    app_name = f"chaos-{app.name}-{scenario}-{uuid.uuid4().hex[:6]}"
    out_dir = session_dir() / f"failover-{app.name}-{scenario}"
    out_dir.mkdir(parents=True, exist_ok=True)
    old_primary, standby = pair.primary, pair.standby
    port = free_port()
    server = AppServer(
        app.name, app.argv(port), clean_env({"CHAOS_PORT": str(port), **app.env(pair, app_name)}),
        out_dir,
    )  # fmt: skip
    samplers = {
        "primary": ConnSampler(old_primary.admin_dsn, app_name),
        "standby": ConnSampler(standby.admin_dsn, app_name),
    }
    loads: list[LoadGen] = []
    try:
        for sampler in samplers.values():
            sampler.start()
        server.start(app.read_path)
        _wait_ready(server, app.read_path, standby.port)
        url = server.url
        writers = LoadGen(url(app.write_path), app_name, "w", out_dir, json_key=app.json_key,
                          json_extra=app.json_extra, clients=WRITERS, think=THINK_S)  # fmt: skip
        readers = LoadGen(url(app.read_path), app_name, "r", out_dir, json_key=app.json_key,
                          json_extra={}, clients=READERS, think=THINK_S, method="GET")  # fmt: skip
        loads += [writers.start(), readers.start()]
        time.sleep(BASELINE_S)
        fault_start = time.monotonic()
        if scenario in PROMOTIONS:
            if scenario == "promote":
                pair.failover()
            else:
                pair.switchover()
            fault_end = pair.promoted_at
        else:
            pair.stop_standby()
            fault_end = time.monotonic()
        time.sleep(AFTER_S)
        written, read = writers.stop(), readers.stop()
        in_use_zero = _in_use_zero(server, app.pool_path, app.processes)
    finally:
        for load in loads:
            load.kill()
        returncode = server.stop()
        for sampler in samplers.values():
            sampler.stop()
    primary_now = standby if scenario in PROMOTIONS else old_primary
    counts = db_counts(primary_now.admin_dsn, app.count_sql, app_name)
    row, problems = _judge(
        app, scenario, written, read, counts, fault_start, fault_end,
        {role: s.max_seen for role, s in samplers.items()},
    )  # fmt: skip
    if not in_use_zero:
        problems.append("pool in_use did not return to 0 after the load stopped")
    if returncode not in (0, -15) or app.shutdown_line not in server.log_text():
        problems.append(f"no graceful shutdown on SIGTERM (exit {returncode})")
    row["problems"], row["passed"] = problems, not problems
    _record(row)
    return row, problems


def _judge(
    app: ClusterApp,
    scenario: str,
    written: dict[str, Any],
    read: dict[str, Any],
    counts: dict[str, int],
    fault_start: float,
    fault_end: float,
    max_seen: dict[str, int],
) -> tuple[dict[str, Any], list[str]]:
    problems: list[str] = []
    writes, reads = written["requests"], read["requests"]
    ok_writes = [r for r in writes if 200 <= r[STATUS] < 300]
    acked = {r[0] for r in ok_writes}
    lost = sorted(acked - counts.keys())
    duplicates = sorted(i for i, n in counts.items() if n > 1)
    if lost:
        problems.append(f"{len(lost)} acknowledged writes are not in the database: {lost[:5]}")
    if duplicates:
        problems.append(f"{len(duplicates)} ids written more than once: {duplicates[:5]}")
    if not any(r[T1] < fault_start for r in ok_writes):
        problems.append("no write succeeded before the fault: the load never got going")
    failed_writes = [r for r in writes if not 200 <= r[STATUS] < 300]
    failed_reads = [r for r in reads if not 200 <= r[STATUS] < 300]
    for kind, failed in (("write", failed_writes), ("read", failed_reads)):
        hung = [r for r in failed if not 500 <= r[STATUS] <= 599]
        if hung:
            problems.append(f"{len(hung)} {kind}s got no HTTP 5xx answer: {short(hung[0][BODY])}")
    late_reads = [r for r in failed_reads if r[T0] >= fault_end + READS_OK_AFTER_S]
    if late_reads:
        problems.append(
            f"{len(late_reads)} reads failed that started >= {READS_OK_AFTER_S} s after the"
            f" fault: {short(late_reads[0][BODY])}"
        )
    # The write outage: the longest time without an acknowledged write around the fault.
    ends = sorted(r[T1] for r in ok_writes if fault_start - 1.0 <= r[T1])
    gap = max((b - a for a, b in itertools.pairwise(ends)), default=None)
    first_write = min((r[T1] for r in ok_writes if r[T1] > fault_end), default=None)
    back = None if first_write is None else first_write - fault_end
    if scenario in PROMOTIONS:
        if back is None or back > WRITES_BACK_WITHIN_S:
            problems.append(f"first write after the promotion: {back} s (target 2 s)")
        late_writes = [r for r in failed_writes if r[T0] >= fault_end + WRITES_BACK_WITHIN_S]
    else:  # the primary never went away: no write may fail
        late_writes = failed_writes
    if late_writes:
        problems.append(
            f"{len(late_writes)} writes failed that should not have: {short(late_writes[0][BODY])}"
        )
    bounds = {"primary": app.per_process[0] * app.processes,
              "standby": app.per_process[1] * app.processes}  # fmt: skip
    for role, seen in max_seen.items():
        if seen > bounds[role]:
            problems.append(f"{seen} connections on the {role} (the pools allow {bounds[role]})")
    row = {
        "framework": app.name,
        "scenario": scenario,
        "writes": len(writes),
        "acknowledged": len(acked),
        "lost": len(lost),
        "duplicates": len(duplicates),
        "failed_writes": len(failed_writes),
        "first_write_after_s": back,
        "write_gap_s": gap,
        "fault_s": fault_end - fault_start,
        "reads": len(reads),
        "failed_reads": len(failed_reads),
        "failed_reads_late": len(late_reads),
        "max_connections": max_seen,
        "bounds": bounds,
        "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    return row, problems


def _record(row: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        rows[f"{row['framework']}/{row['scenario']}"] = row
        RESULTS.write_text(json.dumps(rows, indent=1, sort_keys=True))


def render(rows: dict[str, Any]) -> str:
    """The results as the Markdown table of docs/reliability.md."""
    out = [
        "| scenario | framework | writes acknowledged | lost | fault took | first write"
        " after the promotion | longest write gap | failed writes | failed reads (all /"
        " started >= 1 s after) | max connections: old primary, standby (bound) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key in sorted(rows, key=lambda k: (SCENARIOS.index(k.split("/")[1]), k)):
        r = rows[key]
        back = "-" if r["scenario"] not in PROMOTIONS else f"{r['first_write_after_s']:.2f} s"
        seen, bound = r["max_connections"], r["bounds"]
        out.append(
            f"| {TITLES[r['scenario']]} | {r['framework']} | {r['acknowledged']} of"
            f" {r['writes']} | {r['lost']} | {r['fault_s']:.2f} s | {back} |"
            f" {r['write_gap_s']:.2f} s | {r['failed_writes']} |"
            f" {r['failed_reads']} / {r['failed_reads_late']} | {seen['primary']}"
            f" ({bound['primary']}), {seen['standby']} ({bound['standby']}) |"
        )
    return "\n".join(out)


if __name__ == "__main__":  # print the last run's table
    print(render(json.loads(RESULTS.read_text())))
