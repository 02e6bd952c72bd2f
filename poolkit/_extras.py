"""Optional dependencies: an ImportError that names the extra to install, not a deep module."""

from __future__ import annotations

import importlib


def require_extra(package: str, extra: str, modules: tuple[str, ...]) -> None:
    """Import `modules` or raise ImportError saying `pip install "poolkit[extra]"`.

    Called first thing by an integration package, so `import poolkit_fastapi` without
    FastAPI says what to install instead of `No module named 'anyio'` from three imports down.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            missing = exc.name or module
            raise ImportError(
                f"{package} needs {missing!r}, which is not installed: "
                f'pip install "poolkit[{extra}]"',
                name=missing,
            ) from exc
