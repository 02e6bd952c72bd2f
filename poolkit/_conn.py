"""Connection helpers shared by both pools: config assembly, ping and reset generators."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import Any

from psycopg import OperationalError
from psycopg.conninfo import conninfo_to_dict
from psycopg.generators import execute, fetch_many
from psycopg.pq import ExecStatus

from ._config import PoolConfig
from ._errors import ConfigError

_OK = (ExecStatus.COMMAND_OK, ExecStatus.EMPTY_QUERY, ExecStatus.TUPLES_OK)


def build_config(
    owner: str,
    conninfo: Any,
    config: PoolConfig | None,
    kwargs: Mapping[str, Any] | None,
    reset: Any,
    settings: dict[str, Any],
) -> PoolConfig:
    """Merge a Pool's keyword arguments over an optional PoolConfig, validating once."""
    changes: dict[str, Any] = dict(settings)
    if isinstance(conninfo, str) and conninfo:
        changes["conninfo"] = conninfo
    elif conninfo and not callable(conninfo):
        raise ConfigError("conninfo", conninfo, "is not a string", "pass a URL or DSN string")
    if kwargs:
        base = dict(config.kwargs) if config is not None else {}
        base.update(kwargs)
        changes["kwargs"] = base
    if reset is not None:
        changes["reset"] = reset
    if config is None:
        return PoolConfig.from_dict(changes, source=f"{owner}()")
    return config.replace(**changes) if changes else config


def check_result(results: list[Any]) -> None:
    for res in results:
        if res.status not in _OK:
            raise OperationalError(
                (res.error_message or b"unexpected result").decode("utf-8", "replace")
            )


def drain_gen(pgconn: Any) -> Generator[Any, Any, list[Any]]:
    """Read the answer to a pipelined reset sent when the connection came back."""
    results: list[Any] = yield from fetch_many(pgconn)
    return results


def ping_gen(pgconn: Any) -> Generator[Any, Any, list[Any]]:
    """The cheapest round trip: an empty query, outside psycopg's transaction handling."""
    pgconn.send_query(b"")
    results: list[Any] = yield from execute(pgconn)
    return results


# A connection attempt into a black hole must end: unless the user set one, connects
# give up after this many seconds (and are retried).
DEFAULT_CONNECT_TIMEOUT = 10


def connect_timeout_default(config: PoolConfig) -> int | None:
    """DEFAULT_CONNECT_TIMEOUT, or None when the user set connect_timeout themselves."""
    if "connect_timeout" in config.kwargs:
        return None
    try:
        if "connect_timeout" in conninfo_to_dict(config.conninfo):
            return None
    except Exception:
        pass
    return DEFAULT_CONNECT_TIMEOUT
