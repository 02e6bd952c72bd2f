"""The installed distribution's version, for `poolkit.__version__` and `poolkit --version`."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("poolkit")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
