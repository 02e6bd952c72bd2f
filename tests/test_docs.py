"""The README and docs/: every setting and stats key documented, code samples that hold up.

Every Python block in README.md and docs/*.md must parse, define or import every name it
uses, and import only public poolkit names (listed in the module's `__all__`). Blocks
preceded by `<!-- docs-test: run -->` are run against the suite's server with
`DATABASE_URL` set (a FastAPI sample builds its app; the README's is also served). The
README's first two commands are the ones CI runs.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import dataclasses
import importlib
import re
import tomllib
from pathlib import Path
from typing import Any, NamedTuple, get_type_hints

import httpx
import psycopg
import pytest
from asgi_lifespan import LifespanManager

from poolkit import PoolConfig, PoolStats

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_MARK = "<!-- docs-test: run -->"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
PUBLIC_PACKAGES = ("poolkit", "poolkit_fastapi", "poolkit_django")


class Block(NamedTuple):
    page: Path
    line: int
    lang: str
    code: str
    run: bool

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _blocks() -> list[Block]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            before = text[: m.start()].rstrip("\n")
            found.append(
                Block(
                    page,
                    text[: m.start()].count("\n") + 2,
                    m.group(1),
                    m.group(2),
                    before.endswith(RUN_MARK),
                )
            )
    return found


PYTHON = [b for b in _blocks() if b.lang == "python"]


def _undefined(tree: ast.AST) -> set[str]:
    """Names a block reads but never binds (one scope for the whole block: loose, but it
    catches a sample that uses `url` or `PoolConfig` without defining or importing it)."""
    bound, loaded = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return loaded - bound


def test_every_setting_is_in_the_settings_table() -> None:
    for f in dataclasses.fields(PoolConfig):
        assert f"| `{f.name}` |" in README, f.name


def test_every_stats_key_is_documented() -> None:
    for key in get_type_hints(PoolStats):
        assert f"| `{key}` |" in README, key


def test_ci_runs_the_readme_test_command() -> None:
    blocks = README.split("```")
    commands = [b.strip() for b in blocks[1::2]][:2]
    assert "example_apps.fastapi_app" in commands[0]
    assert "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci
    assert ci[-1] == commands[1], "CI must end with the README's test command"


def test_the_readme_is_a_front_page() -> None:
    assert len(README.splitlines()) <= 300


@pytest.mark.parametrize("block", PYTHON, ids=str)
def test_python_block_defines_what_it_uses(block: Block) -> None:
    tree = ast.parse(block.code, str(block))
    assert not _undefined(tree), f"{block}: undefined names {sorted(_undefined(tree))}"


@pytest.mark.parametrize("block", PYTHON, ids=str)
def test_python_block_imports_only_public_poolkit_names(block: Block) -> None:
    for node in ast.walk(ast.parse(block.code, str(block))):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module]
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            modules, names = [a.name for a in node.names], []
        else:
            continue
        for module in modules:
            if module.split(".")[0] not in PUBLIC_PACKAGES:
                continue
            assert not any(p.startswith("_") for p in module.split(".")), (
                f"{block}: imports the private module {module}"
            )
            exported = importlib.import_module(module).__all__
            for name in names:
                assert name in exported, f"{block}: {module}.{name} is not in its __all__"


def test_docs_name_no_private_module_or_missing_file() -> None:
    for page in PAGES:
        text = page.read_text()
        private = re.findall(r"\bpoolkit(?:_fastapi|_django)?\._[a-z]\w*", text)
        assert not private, f"{page.name} names private modules: {private}"
        assert "DESIGN.md" not in text, f"{page.name} cites DESIGN.md, which is not in the repo"
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_every_extra_the_docs_install_exists() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    for page in PAGES:
        for group in re.findall(r"(?:poolkit|\.|\.whl)\[([\w,-]+)\]", page.read_text()):
            for extra in group.split(","):
                assert extra in extras, f"{page.name}: no extra {extra!r} in pyproject.toml"


RUNNABLE = [b for b in PYTHON if b.run]


def test_the_runnable_blocks_are_the_expected_ones() -> None:
    # A marker lost in an edit would silently stop running a sample.
    pages = sorted({b.page.name for b in RUNNABLE})
    expected = ["README.md", "core.md", "fastapi.md", "migration-psycopg2.md", "sqlalchemy.md"]
    assert pages == expected


@pytest.mark.parametrize("block", RUNNABLE, ids=str)
def test_runnable_block_runs(block: Block, dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", dsn)
    exec(compile(block.code, str(block), "exec"), {"__name__": "__docs__"})


def test_the_readme_fastapi_quick_start_commits(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The README's sample, served for real: POST /notes answers 201 and the row is there.
    from psycopg.conninfo import make_conninfo

    (block,) = [b for b in RUNNABLE if b.page.name == "README.md"]
    schema = "docs_quick_start"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.execute(f"CREATE SCHEMA {schema}")
        admin.execute(f"CREATE TABLE {schema}.notes (id serial PRIMARY KEY, title text)")
    try:
        monkeypatch.setenv("DATABASE_URL", make_conninfo(dsn, options=f"-csearch_path={schema}"))
        namespace: dict[str, Any] = {"__name__": "__docs__"}
        exec(compile(block.code, str(block), "exec"), namespace)
        created, ready = asyncio.run(_post_note(namespace["app"]))
        assert created.status_code == 201, created.text
        assert ready.status_code == 200, ready.text
        with psycopg.connect(dsn) as conn:
            rows = conn.execute(f"SELECT id, title FROM {schema}.notes").fetchall()
        assert rows == [(created.json()["id"], "from the README")]
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


async def _post_note(app: Any) -> tuple[httpx.Response, httpx.Response]:
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            created = await client.post("/notes", params={"title": "from the README"})
            return created, await client.get("/ready")


def test_core_page_lists_every_public_name() -> None:
    import poolkit
    import poolkit.compat

    text = (ROOT / "docs" / "core.md").read_text()
    section = text[text.index("## Public names") :]
    for name in [*poolkit.__all__, "__version__"]:
        assert f"`{name}`" in section, name
    for name in poolkit.compat.__all__:
        assert f"`{name}" in (ROOT / "docs" / "migration-psycopg2.md").read_text(), name
