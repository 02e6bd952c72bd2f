"""Multi-host conninfo, split into one single-host conninfo per server of a cluster."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ._config import mask_conninfo
from ._errors import ConfigError

__all__ = ["split_hosts"]


def _label(params: dict[str, Any]) -> str:
    host = str(params.get("host") or params.get("hostaddr") or "localhost")
    return f"{host}:{params.get('port') or 5432}"


def split_hosts(conninfo: str | Sequence[str]) -> list[tuple[str, str]]:
    """(label, single-host conninfo) for every host of a multi-host conninfo or a URL list."""
    items = [conninfo] if isinstance(conninfo, str) else list(conninfo)
    if not items or not all(isinstance(i, str) and i for i in items):
        raise ConfigError(
            "conninfo", [mask_conninfo(str(i)) for i in items], "names no host",
            'pass "host=a,b port=5432 dbname=app", "postgresql://a,b/app" or a list of URLs',
        )  # fmt: skip
    out: list[tuple[str, str]] = []
    for item in items:
        try:
            params = conninfo_to_dict(item)
        except psycopg.ProgrammingError as exc:
            raise ConfigError("conninfo", mask_conninfo(item), str(exc), "fix its syntax") from None
        # Routing is ours: libpq's own multi-host choice would fight it.
        for key in ("target_session_attrs", "load_balance_hosts"):
            params.pop(key, None)
        fields = {k: str(params.pop(k, "") or "").split(",") for k in ("host", "hostaddr", "port")}
        count = max(len(fields["host"]), len(fields["hostaddr"]))
        for key, values in fields.items():
            if len(values) == 1:
                fields[key] = values * count
            elif len(values) != count:
                raise ConfigError(
                    "conninfo", mask_conninfo(item), f"has {count} hosts and {len(values)} {key}s",
                    f"give one {key} for all hosts or one per host",
                )  # fmt: skip
        for i in range(count):
            one = dict(params)
            for key, values in fields.items():
                if values[i]:
                    one[key] = values[i]
            out.append((_label(one), make_conninfo("", **one)))
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise ConfigError("conninfo", labels, "names a host twice", "list every host once")
    return out
