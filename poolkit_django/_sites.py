"""Where a Django borrow is attributed: the first frame outside Django, asgiref and poolkit."""

from __future__ import annotations

import os
import site
import sys
import sysconfig
from types import FrameType
from typing import Any

import asgiref
import django

import poolkit


def _dir(module: Any) -> str:
    return os.path.dirname(os.path.abspath(str(module.__file__))) + os.sep


_SKIPPED = (_dir(django), _dir(asgiref), _dir(poolkit), _dir(sys.modules[__name__]))
_STDLIB = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep
_SITE = tuple(
    os.path.abspath(p) + os.sep for p in (*site.getsitepackages(), site.getusersitepackages())
)
# By file name, not code object: a str caches its hash, a code object hashes its
# contents on every lookup (this walk runs at every borrow and unpark).
_skip_cache: dict[str, bool] = {}


def _is_framework(filename: str) -> bool:
    return (
        filename.startswith("<")
        or filename.startswith(_SKIPPED)
        or (filename.startswith(_STDLIB) and not filename.startswith(_SITE))
    )


def user_frame(frame: FrameType) -> FrameType:
    """The innermost frame outside Django, asgiref, poolkit and the stdlib: the view,
    command or thread function that made the query (or `frame` if there is none)."""
    cache = _skip_cache
    f: FrameType | None = frame
    for _ in range(64):
        if f is None:
            break
        filename = f.f_code.co_filename
        skip = cache.get(filename)
        if skip is None:
            if len(cache) > 10_000:  # exec()'d or generated code with unique names
                cache.clear()
            skip = cache[filename] = _is_framework(filename)
        if not skip:
            return f
        f = f.f_back
    return frame
