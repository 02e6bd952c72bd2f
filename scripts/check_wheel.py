"""Build poolkit's wheel and check what it ships: CI runs it before the tests (.ci/run).

Usage: python scripts/check_wheel.py [--wheel PATH]   (default: build one into dist/)
Exits non-zero, listing every problem, when a package, a py.typed marker, the dashboard
page, the LICENSE or the metadata is missing, or when tests, bench or the examples leaked in.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("poolkit", "poolkit_fastapi", "poolkit_django")
REQUIRED = (
    *(f"{p}/__init__.py" for p in PACKAGES),
    *(f"{p}/py.typed" for p in PACKAGES),
    "poolkit/dashboard.html",
    "poolkit/compat.py",
    "poolkit_django/base.py",
    "poolkit_django/management/commands/poolkit_status.py",
)
FORBIDDEN_TOP = ("tests", "bench", "example_apps", "scripts", "docs")
USER_EXTRAS = ("fastapi", "django", "prometheus", "otel", "embedded")


def build(dist: Path) -> Path:
    """`pip wheel --no-deps` into `dist` (pip fetches the build backend from PyPI)."""
    dist.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dist) as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--wheel-dir",
                tmp,
                str(ROOT),
            ],
            check=True,
        )
        (built,) = Path(tmp).glob("poolkit-*.whl")
        target = dist / built.name
        built.replace(target)
    return target


def problems(wheel: Path) -> list[str]:
    """Everything wrong with `wheel`'s contents; empty when it is fit to ship."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta_name = next((n for n in names if n.endswith(".dist-info/METADATA")), None)
        metadata = zf.read(meta_name).decode() if meta_name else ""
    found: list[str] = []
    found += [f"missing {n}" for n in REQUIRED if n not in names]
    for n in names:
        top = n.split("/", 1)[0]
        if top in FORBIDDEN_TOP:
            found.append(f"ships {n}")
        elif n.endswith((".pyc", ".orig", ".rej")) or "__pycache__" in n:
            found.append(f"ships build debris {n}")
        elif not (top in PACKAGES or top.endswith(".dist-info")):
            found.append(f"ships {n}, outside the three packages")
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
        found.append("missing the LICENSE file in .dist-info/licenses/")
    msg = Parser().parsestr(metadata)
    if msg.get("License-Expression") != "MIT":
        found.append(f"License-Expression is {msg.get('License-Expression')!r}, not 'MIT'")
    extras = set(msg.get_all("Provides-Extra") or [])
    found += [f"no {e!r} extra" for e in USER_EXTRAS if e not in extras]
    if msg.get("Entry-Points") is None and not any(n.endswith("entry_points.txt") for n in names):
        found.append("no entry_points.txt (the poolkit console script)")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help="check this wheel instead of building one")
    args = parser.parse_args(argv)
    wheel = args.wheel or build(ROOT / "dist")
    found = problems(wheel)
    for p in found:
        print(f"check_wheel: {wheel.name}: {p}", file=sys.stderr)
    if not found:
        print(
            f"check_wheel: {wheel.relative_to(ROOT) if wheel.is_relative_to(ROOT) else wheel}: "
            f"ok ({', '.join(PACKAGES)}, py.typed, dashboard.html, LICENSE)"
        )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
