"""HTTP benchmark plumbing: pinned uvicorn servers, wrk (or a bounded httpx client), tables."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER_CPU = "0"
CLIENT_CPU = "1"


@dataclass
class Result:
    """One load run against one app at one concurrency."""

    requests: int
    errors: int  # non-2xx answers and socket errors
    seconds: float
    p50: float  # seconds
    p99: float

    @property
    def rps(self) -> float:
        return (self.requests - self.errors) / self.seconds if self.seconds else 0.0


def pinning() -> bool:
    """Pin server and client to different CPUs when taskset and two CPUs are there."""
    return shutil.which("taskset") is not None and len(os.sched_getaffinity(0)) >= 2


def _pinned(cpu: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if pinning() else argv


def pin_backends(dsn: str, server_pids: Sequence[int]) -> int:
    """Pin the PostgreSQL backends serving `server_pids` to the client's CPU; how many.

    Unpinned, the scheduler puts some backends on the server's CPU, where they take time
    and cache from the server under test, and which configuration gets how many of them
    is chance: fixed for a whole run (the connections are persistent), so it tilts every
    rep of that run the same way. The backends are found by the server processes'
    client ports (other sessions on a shared server are left alone); re-run after warm-up,
    when lazily opened connections exist. No-op without pinning or without permission.
    """
    if not pinning():
        return 0
    import psutil
    import psycopg

    ports: set[int] = set()
    for pid in server_pids:
        with contextlib.suppress(psutil.Error):
            for c in psutil.Process(pid).net_connections(kind="tcp"):
                if c.raddr and c.status == psutil.CONN_ESTABLISHED:
                    ports.add(c.laddr.port)
    if not ports:
        return 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE client_port = ANY(%s)", [list(ports)]
        ).fetchall()
    pinned = 0
    for (pid,) in rows:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, {int(CLIENT_CPU)})
            pinned += 1
    return pinned


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextmanager
def uvicorn_server(factory: str, env: dict[str, str], ready_path: str) -> Iterator[str]:
    """Run `uvicorn --factory factory` (one worker, pinned); yield its base URL."""
    with uvicorn_process(factory, env, ready_path) as served:
        yield served.url


@dataclass
class Served:
    """A running server: where it answers and the process that serves (for CPU time)."""

    url: str
    pid: int


@contextmanager
def uvicorn_process(factory: str, env: dict[str, str], ready_path: str) -> Iterator[Served]:
    """Like uvicorn_server, also yielding the pid (taskset execs, so it is uvicorn's)."""
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", factory, "--factory", "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1", "--no-access-log",
            "--log-level", "warning"]  # fmt: skip
    log = tempfile.TemporaryFile()  # noqa: SIM115  (closed in the finally below)
    full_env = {**os.environ, **env}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        _pinned(SERVER_CPU, argv), cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + ready_path, proc, log)
        yield Served(url, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: object, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)  # type: ignore[attr-defined]
            output = log.read().decode(errors="replace")  # type: ignore[attr-defined]
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}:\n{output}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout:g} s")


# -- load generation ------------------------------------------------------------------


_WRK_SCRIPT = """
wrk.method = "{method}"
wrk.headers["Content-Type"] = "application/json"
wrk.body = "{{}}"
"""
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def load_tool() -> str:
    return "wrk" if shutil.which("wrk") else "httpx"


def load(url: str, conns: int, seconds: float, method: str = "POST", *, threads: int = 1) -> Result:
    """Drive `url` with `conns` keep-alive connections for `seconds`, from another process
    (`threads` wrk threads; the httpx fallback ignores it)."""
    if load_tool() == "wrk":
        return _wrk(url, conns, seconds, method, threads)
    argv = [sys.executable, "-m", "bench._http", "loadgen", url, str(conns), str(seconds), method]
    out = subprocess.run(
        _pinned(CLIENT_CPU, argv), cwd=ROOT, capture_output=True, text=True, check=True,
        timeout=seconds + 60,
    ).stdout  # fmt: skip
    data = json.loads(out)
    return Result(**data)


def _wrk(url: str, conns: int, seconds: float, method: str, threads: int = 1) -> Result:
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(_WRK_SCRIPT.format(method=method))
        script.flush()
        # wrk takes whole seconds only.
        argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency",
                "--timeout", "10s", "-s", script.name, url]  # fmt: skip
        out = subprocess.run(
            _pinned(CLIENT_CPU, argv), capture_output=True, text=True, check=True,
            timeout=seconds + 60,
        ).stdout  # fmt: skip
    return parse_wrk(out)


def parse_wrk(out: str) -> Result:
    def duration(text: str) -> float:
        m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
        if not m:
            raise ValueError(f"unexpected wrk duration {text!r}")
        return float(m.group(1)) * _UNITS[m.group(2)]

    m = re.search(r"(\d+) requests in ([\d.]+\w+)", out)
    if not m:
        raise ValueError(f"unexpected wrk output:\n{out}")
    requests, seconds = int(m.group(1)), duration(m.group(2))
    pct = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)\s*$", out, re.MULTILINE))
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors += sum(int(n) for n in sock.groups())
    return Result(requests, errors, seconds, duration(pct["50"]), duration(pct["99"]))


async def _loadgen(url: str, conns: int, seconds: float, method: str) -> Result:
    """The fallback client: `conns` tasks, each one request at a time, for `seconds`."""
    import httpx

    limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
    latencies: list[float] = []
    errors = 0
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:
        stop = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    r = await client.request(method, url, json={})
                    ok = r.status_code < 300
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - t0)
                errors += not ok

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(conns)))
        elapsed = time.monotonic() - t0
    latencies.sort()
    n = len(latencies)
    p50 = latencies[n // 2] if n else 0.0
    p99 = latencies[min(n - 1, int(n * 0.99))] if n else 0.0
    return Result(n, errors, elapsed, p50, p99)


# -- reporting ------------------------------------------------------------------------


def versions(*packages: str) -> str:
    out = [f"Python {platform.python_version()}"]
    for name in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out.append(f"{name} {metadata.version(name)}")
    return ", ".join(out)


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model or platform.machine()})"


@dataclass
class Summary:
    """Several runs of one app at one concurrency: medians, and errors summed."""

    rps: float
    p50: float
    p99: float
    errors: int


def summarize(results: Sequence[Result]) -> Summary:
    """Medians over the runs that served requests (a stalled machine serves none)."""
    served = [r for r in results if r.requests] or list(results)
    return Summary(
        rps=statistics.median(r.rps for r in served),
        p50=statistics.median(r.p50 for r in served),
        p99=statistics.median(r.p99 for r in served),
        errors=sum(r.errors for r in results),
    )


def paired_ratio(runs: Sequence[Result], base: Sequence[Result], attr: str = "rps") -> str:
    """The median of per-round ratios: each run against the baseline run of the same round,
    measured seconds apart, so drift of the shared machine cancels out. Rounds where
    either run served nothing (the machine stalled) are left out."""
    ratios = [
        getattr(r, attr) / getattr(b, attr)
        for r, b in zip(runs, base, strict=True)
        if r.requests and b.requests and getattr(b, attr)
    ]
    return f"{statistics.median(ratios):.2f}x" if ratios else "n/a"


def spread(results: Sequence[Result]) -> str:
    rates = [r.rps for r in results]
    if len(rates) < 2:
        return ""
    return f"{min(rates):.0f}-{max(rates):.0f}"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._http")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("loadgen", help="the fallback load generator (prints JSON)")
    gen.add_argument("url")
    gen.add_argument("conns", type=int)
    gen.add_argument("seconds", type=float)
    gen.add_argument("method", nargs="?", default="POST")
    args = parser.parse_args(argv)
    result = asyncio.run(_loadgen(args.url, args.conns, args.seconds, args.method))
    print(json.dumps(result.__dict__))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
