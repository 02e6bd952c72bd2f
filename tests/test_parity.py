"""Pool and AsyncPool stay in step and drop in for psycopg_pool: methods, signatures, tests."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import psycopg_pool
import pytest

from poolkit import AsyncPool, Pool, PoolConfig

HERE = Path(__file__).parent
# Tests that only make sense on one side, with the reason.
ASYNC_ONLY = {
    "test_cancelled_waiter_loses_no_connection": "threads cannot be cancelled mid-wait",
}


def public_methods(cls: type) -> dict[str, inspect.Signature]:
    out = {}
    for name in dir(cls):
        if name.startswith("_") and name not in ("__enter__", "__exit__", "__init__"):
            continue
        attr = getattr(cls, name)
        if callable(attr):
            out[name] = inspect.signature(attr)
    return out


def normalise(sig: inspect.Signature) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_same_public_methods_and_signatures() -> None:
    sync, async_ = public_methods(Pool), public_methods(AsyncPool)
    async_names = {
        n.replace("__aenter__", "__enter__").replace("__aexit__", "__exit__") for n in async_
    }
    assert set(sync) - {"__enter__", "__exit__"} == async_names - {"__enter__", "__exit__"}
    for name, sig in sync.items():
        if name in ("__init__", "__enter__", "__exit__"):
            continue
        assert normalise(sig) == normalise(async_[name]), name


def test_constructor_signatures_match() -> None:
    s = normalise(inspect.signature(Pool.__init__))
    a = normalise(inspect.signature(AsyncPool.__init__))
    # connection_class defaults differ by nature (Connection vs AsyncConnection).
    assert [x[:2] for x in s] == [x[:2] for x in a]


def test_drop_in_for_psycopg_pool_public_api() -> None:
    for ours, theirs in (
        (Pool, psycopg_pool.ConnectionPool),
        (AsyncPool, psycopg_pool.AsyncConnectionPool),
    ):
        # Not a subclass: poolkit owns the whole lifecycle, and inheriting psycopg_pool's
        # methods would leave callable ones that drive state we do not keep.
        assert not issubclass(ours, theirs)
        for name in public_methods(theirs):
            if name in ("run_task", "schedule_task", "worker", "reconnect_failed"):
                continue  # psycopg_pool's internal scheduler, public by accident
            ours_sig = inspect.signature(getattr(ours, name))
            theirs_sig = inspect.signature(getattr(theirs, name))
            # Every argument psycopg_pool accepts is accepted by name or position.
            for p in theirs_sig.parameters.values():
                if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                    continue
                assert p.name in ours_sig.parameters or any(
                    q.kind is q.VAR_KEYWORD for q in ours_sig.parameters.values()
                ), (ours.__name__, name, p.name)


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        n.name
        for n in tree.body
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test_")
    }


def test_same_tests_for_sync_and_async() -> None:
    sync = _test_names(HERE / "test_pool.py")
    async_ = _test_names(HERE / "test_pool_async.py")
    assert sync == async_ - set(ASYNC_ONLY)


@pytest.mark.parametrize(
    "config",
    [
        PoolConfig(conninfo="postgresql://u:secret@localhost/db", min_size=2, max_size=5),
        PoolConfig(
            conninfo="dbname=x",
            min_size=0,
            max_size=1,
            timeout=3.0,
            max_waiting=7,
            max_lifetime=100.0,
            max_idle=50.0,
            name="p",
            pgbouncer=True,
        ),
    ],
)
def test_both_build_psycopg_pool_with_same_arguments(config: PoolConfig) -> None:
    sync: Pool[Any] = Pool(config=config, open=False)
    async_: AsyncPool[Any] = AsyncPool(config=config, open=False)
    fields = (
        "conninfo", "kwargs", "min_size", "max_size", "name", "timeout", "max_waiting",
        "max_lifetime", "max_idle", "reconnect_timeout", "num_workers",
    )  # fmt: skip
    for f in fields:
        if f == "name" and config.name is None:
            continue  # generated names differ by construction
        assert getattr(sync, f) == getattr(async_, f), f
    assert sync.kwargs == config.connect_kwargs()
    assert sync.min_size == config.min_size
    assert sync.max_size == config.resolved_max_size


def test_psycopg_pool_is_used_only_for_its_public_errors() -> None:
    """No private module or attribute of psycopg_pool is imported, read or written."""
    # The error classes, and the two pool classes only to recognise their public
    # check_connection callback in settings.
    allowed = {
        "PoolClosed", "PoolTimeout", "TooManyRequests", "ConnectionPool", "AsyncConnectionPool",
    }  # fmt: skip
    for path in sorted((HERE.parent / "poolkit").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("psycopg_pool"):
                assert node.module == "psycopg_pool", (path.name, node.module)
                assert {a.name for a in node.names} <= allowed, (path.name, node.names)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("psycopg_pool") for a in node.names), path.name
