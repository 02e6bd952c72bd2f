"""The chaos results table: rows saved by each test, rendered to Markdown for the docs."""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from ._harness import ARTIFACTS, ROOT

RESULTS_JSON = ARTIFACTS / "chaos-results.json"
RESULTS_MD = ARTIFACTS / "chaos-results.md"
START_MARK = "<!-- chaos-results:start -->"
END_MARK = "<!-- chaos-results:end -->"

SCENARIO_ORDER = [
    "terminate_backends",
    "postgres_restart",
    "network_cut",
    "network_blackhole",
    "spike",
    "soak",
]
SCENARIO_TITLES = {
    "terminate_backends": "1. every backend terminated",
    "postgres_restart": "2. PostgreSQL stopped ~2 s, started",
    "network_cut": "3. network cut ~2 s (proxy stop)",
    "network_blackhole": "4. network black hole ~2 s",
    "spike": "5. spike: 10x clients for ~10 s",
    "soak": "soak: steady load, rotating connections",
}


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
            timeout=10, check=True,
        )  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return out.stdout.strip() + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> str:
    try:
        data = json.loads(RESULTS_JSON.read_text())
        return str(data.get("machine", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def load_rows(path: Path = RESULTS_JSON) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    rows = data.get("rows", []) if isinstance(data, dict) else []
    return [r for r in rows if isinstance(r, dict)]


def record(row: dict[str, Any]) -> None:
    """Save one scenario's row (replacing an older one for the same framework and scenario)."""
    row = {**row, "recorded_at": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": _git_commit()}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # Runs sharing a checkout update the file one at a time.
    with (ARTIFACTS / "chaos-results.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _save(row)


def _save(row: dict[str, Any]) -> None:
    rows = [
        r
        for r in load_rows()
        if (r.get("framework"), r.get("scenario")) != (row["framework"], row["scenario"])
    ]
    rows.append(row)
    payload = {
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "rows": rows,
    }
    tmp = RESULTS_JSON.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    os.replace(tmp, RESULTS_JSON)
    RESULTS_MD.write_text(render_markdown(rows, payload["machine"]) + "\n")


def _sort_key(row: dict[str, Any]) -> tuple[int, str]:
    scenario = row.get("scenario", "")
    index = SCENARIO_ORDER.index(scenario) if scenario in SCENARIO_ORDER else 99
    return index, row.get("framework", "")


def _failed_cell(row: dict[str, Any]) -> str:
    failed = row.get("failed", 0)
    if not failed:
        return "0"
    parts = ", ".join(f"{n}x {code}" for code, n in sorted(row.get("failed_by_status", {}).items()))
    return f"{failed} ({parts})"


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{value:.2f} s"


def render_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| scenario | framework | requests | acknowledged | lost | duplicates | failed "
        "| recovery | max connections seen (bound) | notes |\n"
        "|---|---|---:|---:|---:|---:|---|---:|---|---|"
    )
    lines = [head]
    for r in sorted(rows, key=_sort_key):
        title = SCENARIO_TITLES.get(r.get("scenario", ""), r.get("scenario", "?"))
        status = "" if r.get("passed", True) else " **(FAILED)**"
        notes = str(r.get("notes", ""))
        if r.get("problems"):
            why = " ".join(str(r["problems"][0]).split())
            notes = "; ".join(filter(None, [notes, f"failed: {why[:160]}"]))
        lines.append(
            f"| {title}{status} | {r.get('framework', '?')} | {r.get('requests', 0)} "
            f"| {r.get('acknowledged', 0)} | {r.get('lost', 0)} | {r.get('duplicates', 0)} "
            f"| {_failed_cell(r)} | {_seconds(r.get('recovery_s'))} "
            f"| {r.get('max_connections', '?')} ({r.get('connection_bound', '?')}) "
            f"| {notes.replace('|', '/')} |"
        )
    return "\n".join(lines)


def render_markdown(rows: list[dict[str, Any]], machine: str = "") -> str:
    commits = sorted({str(r.get("commit", "?")) for r in rows})
    dates = sorted(str(r.get("recorded_at", "")) for r in rows)
    when = f"{dates[0]} to {dates[-1]}" if dates else "never"
    constants = next((r.get("constants") for r in reversed(rows) if r.get("constants")), None)
    out = [
        render_table(rows),
        "",
        f"Measured {when} at commit {', '.join(commits) or '?'} on {machine or 'this machine'}.",
    ]
    if constants:
        settings = ", ".join(f"{k}={v}" for k, v in sorted(constants.items()))
        out += ["", f"Settings: {settings}."]
    return "\n".join(out)


def update_doc(path: Path, block: str) -> bool:
    """Replace the text between the chaos-results markers in `path`; False if it has none."""
    try:
        text = path.read_text()
    except OSError:
        return False
    pattern = re.compile(re.escape(START_MARK) + r".*?" + re.escape(END_MARK), re.DOTALL)
    if not pattern.search(text):
        return False
    new = pattern.sub(lambda _: f"{START_MARK}\n{block}\n{END_MARK}", text, count=1)
    if new != text:
        path.write_text(new)
    return True
