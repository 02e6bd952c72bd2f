"""Load generator for the chaos suite, run in its own process: unique-id writes, every outcome kept.

    python -m tests.chaos._load --url http://127.0.0.1:8000/notes --json-key title --run R \
        --prefix P --clients 4 --out results.json [--think 0.02] [--duration 10]

Each client thread sends ``POST <url>`` with ``{"title": "R/<unique id>"}`` (plus any
``--json-extra`` fields), or with ``--method GET`` a plain ``GET <url>``, back to back (one
HTTP connection per request, so a cut never leaves the outcome of a reused socket ambiguous) and
records (id, client, start, end, status, body-if-not-2xx). Times are ``time.monotonic()``,
which on Linux is one clock for every process, so the test can line them up with its faults.
SIGTERM/SIGINT (or ``--duration``) stops the clients after their current request; the
results are then written to ``--out`` as JSON. Every request and the whole run are bounded.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import sys
import threading
import time
from typing import Any
from urllib.parse import urlsplit

# Bodies of failed answers are kept for the report and the secrets check, truncated.
MAX_BODY = 2000


def _one_request(
    host: str, port: int, path: str, body: bytes | None, timeout: float
) -> tuple[int, str]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"Connection": "close", "Content-Type": "application/json"}
    try:
        conn.request("POST" if body is not None else "GET", path, body=body, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        retry_after = resp.getheader("Retry-After")
        text = "" if 200 <= resp.status < 300 else body[:MAX_BODY].decode(errors="replace")
        if retry_after is not None and resp.status == 503:
            text = f"[Retry-After: {retry_after}] {text}"
        return resp.status, text
    finally:
        conn.close()


def _client(
    index: int,
    args: argparse.Namespace,
    stop: threading.Event,
    deadline: float,
    out: list[list[Any]],
) -> None:
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    extra = json.loads(args.json_extra)
    seq = 0
    while not stop.is_set() and time.monotonic() < deadline:
        ident = f"{args.prefix}-{index}-{seq}"
        seq += 1
        payload = None
        if args.method == "POST":
            payload = json.dumps({**extra, args.json_key: f"{args.run}/{ident}"}).encode()
        t0 = time.monotonic()
        try:
            status, body = _one_request(host, port, parts.path, payload, args.timeout)
        except Exception as exc:  # refused, reset, timed out: no HTTP status at all
            status, body = 0, f"{type(exc).__name__}: {exc}"[:MAX_BODY]
        t1 = time.monotonic()
        out.append([ident, index, t0, t1, status, body])
        if args.think and stop.wait(args.think):
            break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--run", required=True, help="run label stored with every row")
    parser.add_argument("--prefix", required=True, help="id prefix, unique per generator")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--think", type=float, default=0.02, help="pause between requests (s)")
    parser.add_argument("--method", choices=("POST", "GET"), default="POST")
    parser.add_argument("--json-key", required=True, help='the body is {KEY: "RUN/ID"}')
    parser.add_argument("--json-extra", default="{}", help="more JSON fields for the body")
    parser.add_argument("--timeout", type=float, default=20.0, help="per-request HTTP timeout (s)")
    parser.add_argument("--duration", type=float, default=None, help="stop by itself after (s)")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="hard bound (s)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    started = time.monotonic()
    limit = args.max_seconds if args.duration is None else min(args.duration, args.max_seconds)
    deadline = started + limit
    per_client: list[list[list[Any]]] = [[] for _ in range(args.clients)]
    threads = [
        threading.Thread(target=_client, args=(i, args, stop, deadline, per_client[i]), daemon=True)
        for i in range(args.clients)
    ]
    for t in threads:
        t.start()
    print("started", flush=True)
    while not stop.wait(0.1) and time.monotonic() < deadline:
        pass
    stop.set()
    join_by = time.monotonic() + args.timeout + 5.0
    for t in threads:
        t.join(max(0.0, join_by - time.monotonic()))
    hung = sum(t.is_alive() for t in threads)
    result = {
        "pid": os.getpid(),
        "clients": args.clients,
        "started": started,
        "stopped": time.monotonic(),
        "hung_clients": hung,
        # Copied per client: a hung thread may still append while we serialise.
        "requests": [r for rows in per_client for r in list(rows)],
    }
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, args.out)
    return 0 if not hung else 3


if __name__ == "__main__":
    sys.exit(main())
