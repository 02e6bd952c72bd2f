"""Connection helpers shared by both pools: config assembly, dirty tracking, reset and ping."""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from typing import Any

from psycopg import AsyncConnection, OperationalError
from psycopg.generators import execute, fetch_many
from psycopg.pq import ExecStatus

from ._config import PoolConfig
from ._errors import ConfigError

_OK = (ExecStatus.COMMAND_OK, ExecStatus.EMPTY_QUERY, ExecStatus.TUPLES_OK)

# Command tags that leave session state behind: SET/RESET (incl. SET ROLE), LOAD, and
# LISTEN (needs UNLISTEN). set_config() and advisory locks cannot be seen this way.
_SESSION_TAGS = (b"SET", b"RESET", b"LOAD", b"LISTEN")
_LISTEN_TAG = b"LISTEN"
AUTO_RESET = b"RESET ALL; RESET ROLE"
AUTO_RESET_LISTEN = b"RESET ALL; RESET ROLE; UNLISTEN *"

# Client-side connection state a borrower can change without telling the server;
# restored after a borrow that touched the connection. psycopg keeps them in these
# attributes and only checks the transaction status when they are set.
_ATTRS = (
    "_autocommit",
    "_isolation_level",
    "_read_only",
    "_deferrable",
    "row_factory",
    "cursor_factory",
    "server_cursor_factory",
)


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


def remember_attrs(conn: Any) -> None:
    conn._pk_attrs = tuple(getattr(conn, a) for a in _ATTRS)
    conn._pk_prepare_threshold = conn.prepare_threshold


def restore_attrs(conn: Any) -> None:
    """Undo client-side changes (autocommit, isolation, read-only, row factory) of a borrow."""
    for name, value in zip(_ATTRS, conn._pk_attrs, strict=True):
        if getattr(conn, name) is not value:
            setattr(conn, name, value)
    if conn.prepare_threshold != conn._pk_prepare_threshold:
        conn.prepare_threshold = conn._pk_prepare_threshold


_tracking: dict[type, type] = {}
_cursors: dict[type, type] = {}


def tracking_cursor(cls: type[Any]) -> type[Any]:
    """A subclass of cursor class `cls` that notes commands leaving session state behind.

    Every result of execute(), executemany() and pipelines passes `_check_results()`; its
    command tag ("SET", "RESET", "LISTEN"...) says whether the session changed, so the
    pool resets only after such borrows.
    """
    sub = _cursors.get(cls)
    if sub is not None or getattr(cls, "_pk_tracking", False):
        return sub or cls
    base_check = cls._check_results

    def _check_results(self: Any, results: list[Any]) -> None:
        base_check(self, results)
        for res in results:
            tag = res.command_status
            if tag and tag.startswith(_SESSION_TAGS):
                conn = self._conn
                if tag.startswith(_LISTEN_TAG):
                    conn._pk_dirty = AUTO_RESET_LISTEN
                elif conn._pk_dirty is None:
                    conn._pk_dirty = AUTO_RESET

    sub = type(
        cls.__name__,
        (cls,),
        {
            "_check_results": _check_results,
            "_pk_tracking": True,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        },
    )
    _cursors[cls] = sub
    return sub


def install_tracking_cursors(conn: Any) -> None:
    conn.cursor_factory = tracking_cursor(conn.cursor_factory)
    conn.server_cursor_factory = tracking_cursor(conn.server_cursor_factory)


def tracking_class(cls: type[Any]) -> type[Any]:
    """A subclass of `cls` that notes when a borrower talks to the server.

    Every statement, commit, COPY and attribute change (autocommit...) goes through
    `wait()`; a borrow that never reached it left nothing to restore.
    """
    sub = _tracking.get(cls)
    if sub is not None:
        return sub
    wait: Callable[..., Any]
    if issubclass(cls, AsyncConnection):
        base_wait = cls.wait

        async def wait(self: Any, gen: Any, *args: Any, **kwargs: Any) -> Any:
            self._pk_touched = True
            return await base_wait(self, gen, *args, **kwargs)
    else:
        sync_wait = cls.wait

        def wait(self: Any, gen: Any, *args: Any, **kwargs: Any) -> Any:
            self._pk_touched = True
            return sync_wait(self, gen, *args, **kwargs)

    sub = type(
        cls.__name__,
        (cls,),
        {"wait": wait, "__module__": cls.__module__, "__qualname__": cls.__qualname__},
    )
    _tracking[cls] = sub
    return sub
