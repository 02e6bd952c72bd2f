"""Chaos scenarios: a real app server behind the fault proxy, load in another process, one fault."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from tests._helpers import PgControl, PgServer, terminate_backends
from tests._proxy import TcpProxy

from . import _report
from ._checks import T0, Analysis, analyse, percentile, starved_clients
from ._harness import (
    AppServer,
    ConnSampler,
    LoadGen,
    Prober,
    clean_env,
    free_port,
    run_doctor,
    scan_dir,
    session_dir,
)
from ._metrics import WAIT_METRIC, max_counter, prom_quantile

# ---- Durations and sizes (reported with the results) ------------------------------------------
BASE_CLIENTS = 6  # steady load: clients writing (more than POOL_MAX, so some wait)
THINK_S = 0.03  # pause between a client's requests
BASELINE_S = 2.0  # load before the fault
FAULT_S = 2.0  # how long PostgreSQL is down, the network cut or black-holed
POST_FAULT_S = 10.0  # load kept running after the fault ends
RECOVERY_BOUND_S = 8.0  # failures must start no later than this after the fault ends
MIN_OK_AFTER_RECOVERY = 20  # successful requests needed after recovery to call it recovered
SPIKE_S = 10.0
SPIKE_FACTOR = 10  # spike clients per pool connection the server may open
POOL_MIN = 2
POOL_MAX = 4  # per process
POOL_TIMEOUT_S = 1.5  # borrow timeout: shorter than the faults, so 503s are exercised
LEAK_THRESHOLD_S = 5.0
IN_USE_ZERO_WITHIN_S = 15.0
SOAK_S = float(os.environ.get("POOLKIT_TEST_SOAK_SECONDS", "75"))  # per framework
SOAK_WARMUP_S = 15.0  # RSS baseline taken after this
SOAK_LIFETIME_S = 4.0  # max_lifetime during the soak: connections keep rotating
SOAK_IDLE_S = 2.0  # max_idle during the soak
SOAK_THINK_S = 0.05
SOAK_RSS_BOUND_MB = 20.0  # per process, growth after warm-up

CONSTANTS = {
    "clients": BASE_CLIENTS,
    "think_s": THINK_S,
    "baseline_s": BASELINE_S,
    "fault_s": FAULT_S,
    "post_fault_s": POST_FAULT_S,
    "recovery_bound_s": RECOVERY_BOUND_S,
    "spike_s": SPIKE_S,
    "spike_factor": SPIKE_FACTOR,
    "pool": f"min {POOL_MIN}/max {POOL_MAX} per process, timeout {POOL_TIMEOUT_S} s",
    "soak_s": SOAK_S,
    "soak_max_lifetime_s": SOAK_LIFETIME_S,
    "soak_max_idle_s": SOAK_IDLE_S,
}

SCENARIOS = ("terminate_backends", "postgres_restart", "network_cut", "network_blackhole", "spike")

# ---- Frameworks ---------------------------------------------------------------------------------

# Every log line of the apps, debug included for poolkit and psycopg, goes to the captured log.
LOG_CONFIG = Path(__file__).with_name("logging.json")
# example_apps/fastapi_app opens a sync pool (min 1, max 2) next to the async one.
FASTAPI_SYNC_POOL_MAX = 2


@dataclass(frozen=True)
class Framework:
    """How to serve one integration's example app: command, settings, write path, probes."""

    name: str
    processes: int  # processes serving requests, each with its own pools
    bound: int  # connections all the app's pools together may open
    argv: Callable[[int], list[str]]
    env: Callable[[str, str, dict[str, Any]], dict[str, str]]
    write_path: str
    json_key: str  # the write's JSON body is {json_key: "run/id", **json_extra}
    json_extra: dict[str, Any]
    # (id, rows) for one run; one parameter, the run label.
    count_sql: str
    health_path: str  # JSON with every pool's in_use
    in_use: Callable[[dict[str, Any]], int]  # connections lent out, from the health JSON
    metrics_path: str
    probe_paths: tuple[str, ...]
    ready_path: str
    # The server's own line for a completed graceful shutdown (its exit status varies:
    # uvicorn re-raises the SIGTERM it handled).
    shutdown_line: str

    def worker_pids(self, server: AppServer) -> list[int]:
        procs = server.processes()
        # gunicorn: the workers hold the pools, not the master (it only forked them).
        return [p.pid for p in (procs[1:] if self.processes > 1 else procs[:1])]


def _pool_env(settings: dict[str, Any]) -> dict[str, str]:
    return {f"POOLKIT_{k.upper()}": str(v) for k, v in settings.items()}


def _in_use_fastapi(body: dict[str, Any]) -> int:
    return sum(int(p["in_use"]) for p in body["pools"].values())


FASTAPI = Framework(
    name="fastapi",
    processes=1,
    bound=POOL_MAX + FASTAPI_SYNC_POOL_MAX,
    argv=lambda port: [
        *(sys.executable, "-m", "uvicorn", "example_apps.fastapi_app.app:app"),
        *("--host", "127.0.0.1", "--port", str(port), "--timeout-graceful-shutdown", "20"),
        *("--log-config", str(LOG_CONFIG)),
    ],
    env=lambda dsn, app_name, settings: {
        "DATABASE_URL": dsn,
        **_pool_env({"application_name": app_name, **settings}),
    },
    write_path="/notes",
    json_key="title",
    json_extra={},
    count_sql="SELECT split_part(title, '/', 2), count(*) FROM notes"
    " WHERE split_part(title, '/', 1) = %s GROUP BY 1",
    health_path="/ready",
    in_use=_in_use_fastapi,
    metrics_path="/metrics",
    probe_paths=("/ready", "/metrics"),
    ready_path="/ready",
    shutdown_line="Application shutdown complete.",
)


def _in_use_django(body: dict[str, Any]) -> int:
    return sum(int(p["in_use"]) for p in body["pools"].values())


DJANGO_WORKERS = 2
DJANGO_THREADS = 6  # more threads than pool connections: some requests wait for one
DJANGO = Framework(
    name="django",
    processes=DJANGO_WORKERS,
    # The --preload master queried at import, so it keeps a pool of its own.
    bound=(DJANGO_WORKERS + 1) * POOL_MAX,
    argv=lambda port: [
        *(sys.executable, "-m", "gunicorn", "--preload", "--worker-class", "gthread"),
        *("--workers", str(DJANGO_WORKERS), "--threads", str(DJANGO_THREADS)),
        *("--bind", f"127.0.0.1:{port}", "--graceful-timeout", "20"),
        *("--access-logfile", "-", "--error-logfile", "-"),
        # gunicorn's control socket has one path per user: concurrent servers would share it.
        "--no-control-socket",
        "tests.chaos.django_app.wsgi:application",
    ],
    env=lambda dsn, app_name, settings: {
        "DATABASE_URL": dsn,
        "CHAOS_APP_NAME": app_name,
        "CHAOS_POOL": json.dumps(settings),
        "DJANGO_SETTINGS_MODULE": "tests.chaos.django_app.settings",
    },
    # The shop's product create: one INSERT, committed (autocommit) before the 201.
    write_path="/products/",
    json_key="name",
    json_extra={"price": "1.00"},
    count_sql="SELECT split_part(name, '/', 2), count(*) FROM shop_product"
    " WHERE split_part(name, '/', 1) = %s GROUP BY 1",
    health_path="/chaos/pool",
    in_use=_in_use_django,
    metrics_path="/poolkit/metrics",
    probe_paths=("/poolkit/health", "/poolkit/metrics", "/chaos/pool"),
    ready_path="/poolkit/health",
    shutdown_line="Shutting down: Master",
)

FRAMEWORKS = {"fastapi": FASTAPI, "django": DJANGO}


# ---- One run ------------------------------------------------------------------------------------


@dataclass
class Env:
    """What a scenario needs from the session: the server, its control, the secret to hunt."""

    server: PgServer
    control: PgControl | None
    secret_forms: list[str]

    def __repr__(self) -> str:
        # pytest prints fixtures on failure: never the DSN (it holds the password).
        return f"<chaos Env port={self.server.port} control={self.control is not None}>"


@dataclass
class Run:
    """A live app under load, and everything measured about it."""

    framework: Framework
    scenario: str
    env: Env
    out_dir: Path
    app_name: str
    proxy: TcpProxy
    server: AppServer
    sampler: ConnSampler
    prober: Prober
    loads: list[LoadGen] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    last_health: str = ""
    in_use_zero: bool = False
    doctor_exits: list[int] = field(default_factory=list)
    returncode: int | None = None
    fault_start: float = 0.0
    fault_end: float = 0.0
    notes: list[str] = field(default_factory=list)
    extra_problems: list[str] = field(default_factory=list)

    @property
    def bound(self) -> int:
        return self.framework.bound


def db_counts(dsn: str, sql: str, run: str) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(sql, (run,)).fetchall()  # type: ignore[call-overload]
    return {str(i): int(n) for i, n in rows}


def start_run(env: Env, framework: Framework, scenario: str, settings: dict[str, Any]) -> Run:
    app_name = f"chaos-{framework.name}-{scenario}-{uuid.uuid4().hex[:6]}"
    out_dir = session_dir() / f"{framework.name}-{scenario}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    proxy = TcpProxy(env.server.host, env.server.port)
    port = free_port()
    pool = {
        "min_size": POOL_MIN,
        "max_size": POOL_MAX,
        "timeout": POOL_TIMEOUT_S,
        "leak_threshold": LEAK_THRESHOLD_S,
        **settings,
    }
    child_env = clean_env(
        {"CHAOS_PORT": str(port), **framework.env(proxy.dsn_for(env.server.dsn), app_name, pool)}
    )
    server = AppServer(framework.name, framework.argv(port), child_env, out_dir)
    sampler = ConnSampler(env.server.admin_dsn, app_name)
    prober = Prober(server, framework.probe_paths, out_dir / "probes.log")
    run = Run(framework, scenario, env, out_dir, app_name, proxy, server, sampler, prober)
    try:
        sampler.start()
        server.start(framework.ready_path)
        prober.start()
    except BaseException:
        finish(run)
        raise
    return run


def add_load(run: Run, prefix: str, **kwargs: Any) -> LoadGen:
    url = run.server.url(run.framework.write_path)
    load = LoadGen(url, run.app_name, prefix, run.out_dir, json_key=run.framework.json_key,
                   json_extra=run.framework.json_extra, **kwargs)  # fmt: skip
    run.loads.append(load)
    return load.start()


def wait_in_use_zero(run: Run) -> bool:
    """Poll the health page until every worker reports no connection lent out.

    A page answered by a worker carries its "pid" when the app reports it; without one,
    enough consecutive answers (10 per worker) all saying 0 stand for every worker.
    """
    deadline = time.monotonic() + IN_USE_ZERO_WITHIN_S
    workers = set(run.framework.worker_pids(run.server))
    zero_in_a_row = 0
    zero_pids: set[int] = set()
    while time.monotonic() < deadline:
        status, text = run.server.get(run.framework.health_path)
        try:
            body = json.loads(text)
            in_use = run.framework.in_use(body)
        except (ValueError, KeyError, TypeError):
            run.last_health = f"{status}: {text[:300]}"
            zero_in_a_row = 0
            time.sleep(0.1)
            continue
        run.last_health = f"{status}: {text[:300]}"
        pid = body.get("pid") if isinstance(body, dict) else None
        if in_use:
            zero_in_a_row = 0
            zero_pids.discard(pid)  # type: ignore[arg-type]
            time.sleep(0.1)
            continue
        zero_in_a_row += 1
        if pid is not None:
            zero_pids.add(int(pid))
            if workers <= zero_pids:
                return True
        elif zero_in_a_row >= 10 * run.framework.processes:
            return True
    return False


def scrape_metrics(run: Run) -> None:
    """Keep the pool's own figures (a few scrapes: each may reach a different worker)."""
    for _ in range(3 * run.framework.processes):
        status, text = run.server.get(run.framework.metrics_path)
        if status == 200:
            run.metrics.append(text)


def finish(run: Run) -> None:
    """Stop everything the run started; each step bounded, none skipped."""
    for load in run.loads:
        load.kill()
    run.prober.stop()
    run.returncode = run.server.stop()
    run.sampler.stop()
    run.proxy.close()


def conclude(run: Run, *, fault: bool = True) -> tuple[Analysis, dict[str, Any], list[str]]:
    """Stop the load, check everything, record the row; returns the analysis and the problems.

    Without a `fault` (the soak) every failed request is a problem and nothing recovers.
    """
    for load in run.loads:
        run.results.append(load.stop())
    run.in_use_zero = wait_in_use_zero(run)
    scrape_metrics(run)
    finish(run)
    records = [r for res in run.results for r in res["requests"]]
    counts = db_counts(run.env.server.dsn, run.framework.count_sql, run.app_name)
    analysis = analyse(records, counts, run.fault_start, run.fault_end, RECOVERY_BOUND_S)
    problems = analysis.problems() + list(run.extra_problems)
    if analysis.ok_before_fault == 0:
        problems.append("no request succeeded before the fault: the load never got going")
    if fault and (analysis.recovery_s is None or analysis.recovery_s > RECOVERY_BOUND_S):
        problems.append(f"recovery took {analysis.recovery_s} s (bound {RECOVERY_BOUND_S} s)")
    if fault and analysis.ok_after_recovery < MIN_OK_AFTER_RECOVERY:
        problems.append(
            f"only {analysis.ok_after_recovery} requests succeeded after recovery"
            f" (want {MIN_OK_AFTER_RECOVERY})"
        )
    if not run.in_use_zero:
        problems.append(
            f"pool in_use did not return to 0 within {IN_USE_ZERO_WITHIN_S} s;"
            f" last health answer: {run.last_health}"
        )
    if run.sampler.max_seen > run.bound:
        problems.append(
            f"the server saw {run.sampler.max_seen} connections named {run.app_name!r};"
            f" the pools allow {run.bound}"
        )
    if run.sampler.samples == 0:
        problems.append("the connection sampler never read pg_stat_activity")
    for res in run.results:
        if res.get("hung_clients"):
            problems.append(f"{res['hung_clients']} load clients hung")
    if run.returncode not in (0, -15) or run.framework.shutdown_line not in run.server.log_text():
        problems.append(
            f"the app server did not shut down gracefully on SIGTERM (exit {run.returncode},"
            f" no {run.framework.shutdown_line!r} in its log)"
        )
    leaks = run.server.log_text().count(" poolkit.leak ")
    if leaks:
        run.notes.append(f"{leaks} leak warnings")
    secrets = scan_dir(run.out_dir, run.env.secret_forms)
    if secrets:
        problems.append(f"the database password appears in {secrets}")
    if f"'{run.proxy.port}'" not in run.server.log_text():
        # The secret scan means something only if the logs show connection details.
        problems.append("the app log never shows the server's address: is logging captured?")
    row = {
        "framework": run.framework.name,
        "scenario": run.scenario,
        "requests": analysis.requests,
        "acknowledged": analysis.acknowledged,
        "lost": len(analysis.lost),
        "duplicates": len(analysis.duplicates),
        "failed": analysis.failed,
        "failed_by_status": analysis.failed_by_status,
        "recovery_s": analysis.recovery_s,
        "max_connections": run.sampler.max_seen,
        "connection_bound": run.bound,
        "client_latency_p99_s": analysis.latency_p99,
        "client_latency_max_s": analysis.latency_max,
        "pool_wait_p99_s": max(
            (q for t in run.metrics if (q := prom_quantile(t, WAIT_METRIC, 0.99)) is not None),
            default=None,
        ),
        "connections_lost": max_counter(run.metrics, "poolkit_connections_lost_total"),
        "connections_created": max_counter(run.metrics, "poolkit_connections_created_total"),
        "probe_responses": run.prober.responses,
        "doctor_exits": run.doctor_exits,
        "sample_failures": analysis.sample_failures,
        "notes": "; ".join(run.notes),
        "problems": problems,
        "passed": not problems,
        "constants": CONSTANTS,
    }
    _report.record(row)
    return analysis, row, problems


# ---- Faults -------------------------------------------------------------------------------------


def inject(run: Run, scenario: str) -> None:
    """Apply one fault while the load runs; sets run.fault_start/fault_end (monotonic)."""
    env = run.env
    run.fault_start = time.monotonic()
    if scenario == "terminate_backends":
        pids = terminate_backends(env.server.admin_dsn, application_name=run.app_name)
        run.notes.append(f"{len(pids)} backends terminated")
        if not pids:
            run.extra_problems.append("no backend to terminate: the app had no connection")
    elif scenario == "postgres_restart":
        assert env.control is not None
        env.control.stop("fast")
        time.sleep(FAULT_S)
        env.control.start()
    elif scenario == "network_cut":
        run.proxy.stop()
        time.sleep(FAULT_S)
        run.proxy.start()
    elif scenario == "network_blackhole":
        run.proxy.deaf(True)
        time.sleep(FAULT_S)
        run.proxy.deaf(False)
    elif scenario == "spike":
        # 10x the connections the write path can use (the async pools).
        clients = SPIKE_FACTOR * POOL_MAX * run.framework.processes
        spike = add_load(run, "spike", clients=clients, think=0.0, duration=SPIKE_S)
        result = spike.wait()
        run.loads.remove(spike)
        run.results.append(result)
        starved = starved_clients(result["requests"], clients)
        waits = [r[3] - r[T0] for r in result["requests"]]
        per_client = [
            sum(1 for r in result["requests"] if r[1] == c and 200 <= r[4] < 300)
            for c in range(clients)
        ]
        run.notes.append(
            f"{clients} spike clients, none starved (fewest successes per client:"
            f" {min(per_client, default=0)}); client latency p99 {percentile(waits, 0.99):.2f} s"
            f" / max {max(waits, default=0):.2f} s"
            if not starved
            else f"{len(starved)} of {clients} spike clients starved"
        )
        if starved:
            run.extra_problems.append(f"spike clients never served: {starved}")
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    run.fault_end = time.monotonic()


def run_scenario(env: Env, framework: Framework, scenario: str) -> tuple[dict[str, Any], list[str]]:
    run = start_run(env, framework, scenario, {})
    try:
        add_load(run, "base", clients=BASE_CLIENTS, think=THINK_S)
        time.sleep(BASELINE_S)
        # The operator's CLI, through the same faulty path, during the fault and after it.
        doctors = [_doctor_later(run, 0.5)]
        inject(run, scenario)
        doctors.append(_doctor_later(run, 2.0))
        time.sleep(POST_FAULT_S)
        for thread in doctors:
            thread.join(90)
        _, row, problems = conclude(run)
    finally:
        finish(run)
    if scenario == "spike" and row["pool_wait_p99_s"] is not None:
        row["notes"] += f"; pool wait p99 <= {row['pool_wait_p99_s']:.3f} s (histogram bucket)"
        _report.record(row)
    return row, problems


def _doctor_later(run: Run, delay: float) -> threading.Thread:
    dsn = run.proxy.dsn_for(run.env.server.dsn)
    args = ("--application-name", run.app_name, "--processes", str(run.framework.processes))

    def go() -> None:
        time.sleep(delay)
        run.doctor_exits.append(run_doctor(dsn, run.out_dir / "doctor.log", *args))

    thread = threading.Thread(target=go, daemon=True, name="doctor")
    thread.start()
    return thread


def run_soak(env: Env, framework: Framework) -> tuple[dict[str, Any], list[str]]:
    """Steady load with short max_lifetime/max_idle: connections rotate, nothing may fail."""
    settings = {"max_lifetime": SOAK_LIFETIME_S, "max_idle": SOAK_IDLE_S, "leak_threshold": 2.0}
    run = start_run(env, framework, "soak", settings)
    try:
        add_load(run, "soak", clients=BASE_CLIENTS, think=SOAK_THINK_S)
        rss: dict[int, list[tuple[float, int]]] = {}
        t0 = time.monotonic()
        run.fault_start = run.fault_end = t0 + SOAK_S + 60  # no fault: every failure counts
        while (now := time.monotonic()) < t0 + SOAK_S:
            for pid, value in run.server.rss().items():
                rss.setdefault(pid, []).append((now - t0, value))
            time.sleep(1.0)
        growth = {
            pid: (series[-1][1] - _at(series, SOAK_WARMUP_S)) / 2**20
            for pid, series in rss.items()
            if pid in framework.worker_pids(run.server)
        }
        _, row, problems = conclude(run, fault=False)
    finally:
        finish(run)
    log = run.server.log_text()
    leaks = log.count(" poolkit.leak ")
    worst = max(growth.values(), default=0.0)
    failures = row["failed"]
    extra = []
    if failures:
        extra.append(f"{failures} requests failed during the soak (none may)")
    if leaks:
        extra.append(f"{leaks} leak warnings in the app log")
    if worst > SOAK_RSS_BOUND_MB:
        extra.append(f"RSS grew {worst:.1f} MB after warm-up (bound {SOAK_RSS_BOUND_MB} MB)")
    created = row["connections_created"]
    if created <= run.bound:
        extra.append(f"only {created:.0f} connections created: they did not rotate")
    row["notes"] = (
        f"{SOAK_S:.0f} s; {created:.0f} connections opened in turn (max_lifetime"
        f" {SOAK_LIFETIME_S} s); RSS growth after warm-up {worst:+.1f} MB (bound"
        f" {SOAK_RSS_BOUND_MB} MB); {leaks} leak warnings"
    )
    # In a soak every failure is a problem, so "recovery" has no meaning.
    row["recovery_s"] = None
    problems += extra
    row["problems"], row["passed"] = problems, not problems
    _report.record(row)
    return row, problems


def _at(series: list[tuple[float, int]], when: float) -> int:
    for t, value in series:
        if t >= when:
            return value
    return series[-1][1]
