"""Connection helpers shared by both pools: config assembly, ping and reset generators."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from psycopg import OperationalError
from psycopg.conninfo import conninfo_to_dict
from psycopg.generators import execute, fetch_many
from psycopg.pq import ExecStatus

from ._config import PoolConfig

_OK = (ExecStatus.COMMAND_OK, ExecStatus.EMPTY_QUERY, ExecStatus.TUPLES_OK)


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


def check_callbacks(**callbacks: object) -> None:
    """Refuse a callback setting that is not callable, naming it: otherwise it fails on
    every new connection or borrow, in the background, as a PoolTimeout (psycopg_pool's
    case too)."""
    for name, fn in callbacks.items():
        if fn is not None and not callable(fn):
            raise TypeError(f"{name}={fn!r} is not callable: pass a function, or None")


def is_builtin_check(check: object) -> bool:
    """True for the pools' own `check_connection` (poolkit's or psycopg_pool's): it means
    the pool's built-in validation (deadline-bounded; a failure invalidates older idle
    connections), not a user callback run as it is."""
    if check is None:
        return False
    from psycopg_pool import AsyncConnectionPool, ConnectionPool

    from ._upkeep import Upkeep
    from ._upkeep_async import AsyncUpkeep

    builtin = (
        Upkeep.check_connection,
        AsyncUpkeep.check_connection,
        ConnectionPool.check_connection,
        AsyncConnectionPool.check_connection,
    )
    return any(check is b for b in builtin)
