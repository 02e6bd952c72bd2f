"""Loaded by a test subprocess (via PYTHONPATH): $POOLKIT_TEST_BLOCK's packages look uninstalled."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

_BLOCKED = frozenset(filter(None, os.environ.get("POOLKIT_TEST_BLOCK", "").split(",")))


class _Hiding:
    """Wraps a meta-path finder; finds nothing for the blocked packages, as when not installed.

    Every finder is wrapped (rather than one raising in front of them) so `find_spec()`
    returns None and `import` fails with the same ModuleNotFoundError as a missing package.
    """

    def __init__(self, finder: Any) -> None:
        self._finder = finder

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name.partition(".")[0] in _BLOCKED:
            return None
        find = getattr(self._finder, "find_spec", None)
        return None if find is None else find(name, path, target)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._finder, name)


if _BLOCKED:
    sys.meta_path[:] = [_Hiding(f) for f in sys.meta_path]
