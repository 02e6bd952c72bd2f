"""What a new user meets first: the version, the license, and integrations without their extra."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import poolkit
from poolkit._cli import main

ROOT = Path(__file__).parent.parent
BLOCKER = Path(__file__).parent / "_blocker"


def _python(code: str, block: str = "") -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter in which the `block`ed packages cannot be imported."""
    env = {**os.environ, "POOLKIT_TEST_BLOCK": block}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BLOCKER), str(ROOT)]))
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("package", "blocked", "extra"),
    [
        ("poolkit_fastapi", "fastapi", "fastapi"),
        ("poolkit_fastapi", "anyio", "fastapi"),
        ("poolkit_django", "django", "django"),
        ("poolkit_django", "asgiref", "django"),
    ],
)
def test_an_integration_without_its_extra_names_the_extra(
    package: str, blocked: str, extra: str
) -> None:
    done = _python(f"import {package}", block=blocked)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        f"ImportError: {package} needs {blocked!r}, which is not installed: "
        f'pip install "poolkit[{extra}]"'
    ), done.stderr


def test_the_blocker_blocks_only_what_it_is_told() -> None:
    # The control for the test above: the same subprocess imports both integrations when
    # nothing is blocked, and it really does block what it names.
    assert _python("import poolkit_fastapi, poolkit_django").returncode == 0
    blocked = _python("import anyio", block="anyio")
    assert "No module named 'anyio'" in blocked.stderr


def test_the_core_needs_no_extra() -> None:
    done = _python(
        "import poolkit, poolkit.compat; print(poolkit.__version__)",
        block="fastapi,starlette,anyio,django,asgiref,prometheus_client,opentelemetry,pgserver",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == poolkit.__version__


def test_version_comes_from_the_package_metadata() -> None:
    from importlib.metadata import version

    assert poolkit.__version__ == version("poolkit")


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"poolkit {poolkit.__version__}"


def test_license_file_matches_the_metadata() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert 'license = "MIT"' in (ROOT / "pyproject.toml").read_text()
