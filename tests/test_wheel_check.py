"""scripts/check_wheel.py (run by CI on the built wheel) rejects what must not ship."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).parent.parent


def _checker() -> ModuleType:
    path = ROOT / "scripts" / "check_wheel.py"
    spec = importlib.util.spec_from_file_location("check_wheel", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


METADATA = "\n".join(
    [
        "Metadata-Version: 2.4",
        "Name: poolkit",
        "License-Expression: MIT",
        *(f"Provides-Extra: {e}" for e in ("fastapi", "django", "prometheus", "otel", "embedded")),
        "",
    ]
)


def _wheel(path: Path, names: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name in names:
            zf.writestr(name, METADATA if name.endswith("METADATA") else "")
    return path


def test_a_complete_wheel_passes(tmp_path: Path) -> None:
    check = _checker()
    names = [
        *check.REQUIRED,
        "poolkit-0.1.0.dist-info/METADATA",
        "poolkit-0.1.0.dist-info/entry_points.txt",
        "poolkit-0.1.0.dist-info/licenses/LICENSE",
    ]
    assert check.problems(_wheel(tmp_path / "ok.whl", names)) == []


def test_missing_markers_and_leaked_directories_are_reported(tmp_path: Path) -> None:
    check = _checker()
    names = [
        n for n in check.REQUIRED if n not in ("poolkit_django/py.typed", "poolkit/dashboard.html")
    ]
    names += [
        "poolkit-0.1.0.dist-info/METADATA",
        "tests/test_pool.py",
        "example_apps/fastapi_app/app.py",
        "bench/core.py",
    ]
    found = check.problems(_wheel(tmp_path / "bad.whl", names))
    assert "missing poolkit_django/py.typed" in found
    assert "missing poolkit/dashboard.html" in found
    assert "missing the LICENSE file in .dist-info/licenses/" in found
    for leaked in ("tests/test_pool.py", "example_apps/fastapi_app/app.py", "bench/core.py"):
        assert f"ships {leaked}" in found
