"""Run the chaos and soak suite, then write its results table into the docs.

    .venv/bin/python scripts/chaos_report.py            # run tests/chaos, update the docs
    .venv/bin/python scripts/chaos_report.py --no-run   # re-render the last run's results

The suite writes test-artifacts/chaos-results.json (and .md) as each scenario ends; this
script starts from an empty file, so the table comes from one run, and replaces the text
between ``<!-- chaos-results:start -->`` and ``<!-- chaos-results:end -->`` in
docs/reliability.md and in README.md (when it has the markers). A failed run leaves the
docs untouched unless ``--allow-failures`` is given (the failures are then marked).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.chaos import _report  # noqa: E402  (needs ROOT on sys.path)
from tests.chaos._scenarios import FRAMEWORKS, SCENARIOS  # noqa: E402

TARGETS = (ROOT / "docs" / "reliability.md", ROOT / "README.md")


def run_suite(pytest_args: list[str]) -> int:
    _report.RESULTS_JSON.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "pytest", "tests/chaos", "-q", "-p", "no:cacheprovider"]
    print("running:", " ".join(argv[2:] + pytest_args), flush=True)
    started = time.monotonic()
    code = subprocess.call([*argv, *pytest_args], cwd=ROOT)
    print(f"suite finished in {time.monotonic() - started:.0f} s with exit code {code}")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-run", action="store_true", help="only re-render the last results")
    parser.add_argument(
        "--allow-failures", action="store_true", help="update the docs even if a scenario failed"
    )
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)

    code = 0 if args.no_run else run_suite(args.pytest_args)
    rows = _report.load_rows()
    expected = {(f, s) for f in FRAMEWORKS for s in (*SCENARIOS, "soak")}
    missing = sorted(expected - {(r.get("framework"), r.get("scenario")) for r in rows})
    failed = sorted((r["framework"], r["scenario"]) for r in rows if not r.get("passed"))
    for what, items in (("missing", missing), ("failed", failed)):
        if items:
            print(f"{what}: {', '.join(f'{f}/{s}' for f, s in items)}", file=sys.stderr)
    if (missing or failed or code) and not args.allow_failures:
        print("docs not updated (use --allow-failures to publish anyway)", file=sys.stderr)
        return code or 1
    block = _report.render_markdown(rows, _report.machine())
    updated = [str(p.relative_to(ROOT)) for p in TARGETS if _report.update_doc(p, block)]
    print(block)
    print(f"\nupdated: {', '.join(updated) or 'nothing (no markers found)'}")
    return 0 if updated else 1


if __name__ == "__main__":
    sys.exit(main())
