"""ClusterPool and AsyncClusterPool stay in step: same public methods, signatures and tests."""

from __future__ import annotations

import ast
import importlib.util
import inspect
from pathlib import Path
from typing import Any, get_type_hints

from poolkit import AsyncClusterPool, ClusterPool, ClusterStats, HostStats

HERE = Path(__file__).parent
ROOT = HERE.parent


def _public(cls: type) -> dict[str, list[tuple[str, Any, Any]]]:
    out = {}
    for name in dir(cls):
        if name.startswith("_") and name != "__init__":
            continue
        attr = getattr(cls, name)
        if callable(attr):
            sig = inspect.signature(attr)
            # The one default that differs by design: the connection class of each world.
            out[name] = [
                (p.name, p.kind, None if isinstance(p.default, type) else p.default)
                for p in sig.parameters.values()
            ]
    return out


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_same_public_methods_and_signatures() -> None:
    sync, async_ = _public(ClusterPool), _public(AsyncClusterPool)
    assert sync.keys() == async_.keys()
    for name in sync:
        assert sync[name] == async_[name], name


def test_same_tests_for_sync_and_async() -> None:
    # test_cluster.py is generated from the async file; this guards a hand edit.
    assert _test_names(HERE / "test_cluster.py") == _test_names(HERE / "test_cluster_async.py")


def test_generated_sync_cluster_is_current() -> None:
    spec = importlib.util.spec_from_file_location(
        "async_to_sync", ROOT / "scripts/async_to_sync.py"
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    source = "poolkit/_cluster_async.py"
    want = script.convert((ROOT / source).read_text(), source)
    assert (ROOT / "poolkit/_cluster.py").read_text() == want, (
        "poolkit/_cluster.py is stale: run python scripts/async_to_sync.py"
    )


def test_every_cluster_stats_key_is_documented() -> None:
    doc = (ROOT / "docs" / "cluster.md").read_text()
    for cls in (ClusterStats, HostStats):
        for key in get_type_hints(cls):
            assert f"`{key}`" in doc, (cls.__name__, key)
