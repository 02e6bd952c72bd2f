"""Generate poolkit's sync modules from their async sources (and check they are current).

Usage:
    python scripts/async_to_sync.py          # rewrite every generated file
    python scripts/async_to_sync.py --check  # exit 1, with a diff, if any is stale

The rewrite works on Python tokens, so comments and layout survive:
- `async def` / `async with` / `async for` lose `async`; `await x` becomes `x`;
- names are mapped (NAMES below: AsyncPool -> Pool, _acompat -> _compat, ...), in code and,
  for a few phrases (TEXT below), in strings and comments;
- a line ending in `# async-only` is dropped, and so are the lines from `# >>> async-only`
  to `# <<<`; a line ending in `# sync: CODE` becomes CODE (same indentation), for the
  rare places where the two genuinely differ. Prefer
  `if ASYNC:` (a constant from _acompat/_compat) where both branches type-check.
The module docstring keeps its first line and says where the file comes from.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import io
import re
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# source -> generated, relative to the repository root.
FILES: dict[str, str | None] = {
    "poolkit/_upkeep_async.py": "poolkit/_upkeep.py",
    "poolkit/_lifecycle_async.py": "poolkit/_lifecycle.py",
    "poolkit/_returns_async.py": "poolkit/_returns.py",
    "poolkit/_waits_async.py": "poolkit/_waits.py",
    "poolkit/_topology_async.py": "poolkit/_topology.py",
    "poolkit/_pool_async.py": "poolkit/_pool.py",
    "poolkit/_cluster_async.py": "poolkit/_cluster.py",
    "tests/_tcompat_async.py": None,  # hand-written pair (tests/_tcompat.py), not generated
    "tests/test_trust_async.py": "tests/test_trust.py",
    "tests/test_credentials_async.py": "tests/test_credentials.py",
    "tests/test_pool_async.py": "tests/test_pool.py",
    "tests/test_parking_async.py": "tests/test_parking.py",
    "tests/test_cluster_async.py": "tests/test_cluster.py",
}

NAMES = {
    "ACT": "CT",
    "AsyncClusterPool": "ClusterPool",
    "AsyncConnection": "Connection",
    "AsyncConnectionPool": "ConnectionPool",
    "AsyncIterator": "Iterator",
    "AsyncLifecycle": "Lifecycle",
    "AsyncPool": "Pool",
    "AsyncReturns": "Returns",
    "AsyncWaits": "Waits",
    "AsyncTopology": "Topology",
    "AsyncUpkeep": "Upkeep",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
    "_acompat": "_compat",
    "_cluster_acompat": "_cluster_compat",
    "_cluster_async": "_cluster",
    "_lifecycle_async": "_lifecycle",
    "_pool_async": "_pool",
    "_returns_async": "_returns",
    "_waits_async": "_waits",
    "_topology_async": "_topology",
    "_upkeep_async": "_upkeep",
    "_tcompat_async": "_tcompat",
    "aclose": "close",
    "anext": "next",
    "MakeAsyncPool": "MakePool",
}

TEXT = (
    ("async with", "with"),
    ("await ", ""),
    ("AsyncConnectionPool", "ConnectionPool"),
    ("AsyncClusterPool", "ClusterPool"),
    ("AsyncPool", "Pool"),
    ("AsyncLifecycle", "Lifecycle"),
    ("an asyncio", "a threaded"),
    ("asyncio task", "thread"),
    ("tasks'", "threads'"),
)

_SYNC_MARK = re.compile(r"^(\s*).*?#\s*sync:\s*(.*?)\s*$")
_ASYNC_ONLY = re.compile(r"#\s*async-only\s*$")
_BLOCK_START = re.compile(r"^\s*#\s*>>>\s*async-only\s*$")
_BLOCK_END = re.compile(r"^\s*#\s*<<<\s*$")


def convert(source: str, src_name: str) -> str:
    lines = []
    skipping = False
    for line in source.splitlines(keepends=True):
        if _BLOCK_START.match(line):
            skipping = True
            continue
        if skipping:
            skipping = not _BLOCK_END.match(line)
            continue
        if _ASYNC_ONLY.search(line):
            continue
        m = _SYNC_MARK.match(line)
        if m:
            line = f"{m.group(1)}{m.group(2)}\n"
        lines.append(line)
    text = "".join(lines)
    out = _rewrite_tokens(text)
    out = _rewrite_docstring(out, src_name)
    ast.parse(out)  # the result must be valid Python
    return _ruff(out, src_name)


def _ruff(text: str, src_name: str) -> str:
    """Sort imports and format as the rest of the code base (names changed length)."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        raise SystemExit("async_to_sync: ruff is needed (pip install -e '.[dev]')")
    name = str(ROOT / src_name)
    for cmd in (
        [ruff, "check", "--select", "I,F401", "--fix", "--quiet", "--stdin-filename", name, "-"],
        [ruff, "format", "--quiet", "--stdin-filename", name, "-"],
    ):
        done = subprocess.run(cmd, input=text, capture_output=True, text=True, cwd=ROOT)
        if done.returncode not in (0, 1) or not done.stdout:
            raise SystemExit(f"async_to_sync: {' '.join(cmd[:2])} failed: {done.stderr}")
        text = done.stdout
    return text


def _rewrite_tokens(text: str) -> str:
    tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    # Work on (line, col) spans from the end so earlier positions stay valid.
    line_starts = [0]
    for line in text.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))

    def offset(pos: tuple[int, int]) -> int:
        return line_starts[pos[0] - 1] + pos[1]

    edits: list[tuple[int, int, str]] = []
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.NAME:
            if tok.string in ("async", "await"):
                nxt = tokens[i + 1]
                if tok.string == "async" and nxt.string not in ("def", "with", "for"):
                    continue
                # Drop the keyword and the spaces up to the next token.
                edits.append((offset(tok.start), offset(nxt.start), ""))
            elif tok.string in NAMES:
                edits.append((offset(tok.start), offset(tok.end), NAMES[tok.string]))
        elif tok.type in (tokenize.STRING, tokenize.COMMENT):
            new = tok.string
            for old, rep in TEXT:
                new = new.replace(old, rep)
            for old, rep in NAMES.items():
                new = re.sub(rf"\b{re.escape(old)}\b", rep, new)
            if new != tok.string:
                edits.append((offset(tok.start), offset(tok.end), new))
    for start, end, rep in sorted(edits, reverse=True):
        text = text[:start] + rep + text[end:]
    return text


def _rewrite_docstring(text: str, src_name: str) -> str:
    tree = ast.parse(text)
    doc = ast.get_docstring(tree, clean=False)
    header = (
        f"# WARNING: generated from {src_name} by scripts/async_to_sync.py: do not edit.\n"
        "# Edit the async source, then run `python scripts/async_to_sync.py`.\n"
    )
    if doc is None:
        return header + text
    node = tree.body[0]
    first = doc.strip().splitlines()[0]
    lines = text.splitlines(keepends=True)
    start, end = node.lineno - 1, node.end_lineno or node.lineno
    new_doc = f'"""{first}\n\nGenerated from {src_name}: edit that file, not this one.\n"""\n'
    return header + "".join(lines[:start]) + new_doc + "".join(lines[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if stale")
    args = parser.parse_args(argv)
    stale = 0
    for src, dst in FILES.items():
        if dst is None:
            continue
        src_path, dst_path = ROOT / src, ROOT / dst
        if not src_path.exists():
            continue
        want = convert(src_path.read_text(), src)
        have = dst_path.read_text() if dst_path.exists() else ""
        if want == have:
            continue
        if args.check:
            stale += 1
            sys.stdout.writelines(
                difflib.unified_diff(
                    have.splitlines(keepends=True),
                    want.splitlines(keepends=True),
                    fromfile=f"{dst} (committed)",
                    tofile=f"{dst} (generated from {src})",
                )
            )
        else:
            dst_path.write_text(want)
            print(f"wrote {dst}")
    if stale:
        print(f"\n{stale} generated file(s) are stale: run python scripts/async_to_sync.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
