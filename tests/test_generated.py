"""The sync modules are generated from the async sources: a stale one fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "async_to_sync.py"


def test_generated_sync_modules_are_current() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, (
        "a generated sync module differs from its async source; run "
        f"`python scripts/async_to_sync.py`:\n{done.stdout}{done.stderr}"
    )


def test_generated_files_say_so_in_their_first_lines() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import async_to_sync
    finally:
        sys.path.pop(0)
    for src, dst in async_to_sync.FILES.items():
        if dst is None or not (ROOT / src).exists():
            continue
        head = (ROOT / dst).read_text().splitlines()[0]
        assert head.startswith("# WARNING: generated from"), dst
        assert src in head, dst


def test_the_check_fails_on_a_stale_file(tmp_path: Path) -> None:
    """The check must be able to fail: convert a source with one change, compare."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import async_to_sync
    finally:
        sys.path.pop(0)
    src = "poolkit/_pool_async.py"
    text = (ROOT / src).read_text()
    good = async_to_sync.convert(text, src)
    assert good == (ROOT / "poolkit/_pool.py").read_text()
    changed = async_to_sync.convert(text.replace("def _lend(", "def _lend2(", 1), src)
    assert changed != good
    assert "await " not in good.replace("await` ", "")
    assert "async def" not in good
