"""FastAPI integration: a lifespan opening poolkit pools and per-request connection dependencies."""

from poolkit._extras import require_extra

require_extra("poolkit_fastapi", "fastapi", ("fastapi", "starlette", "anyio"))

# The imports below need the extra: they run after the check on purpose.
from ._deps import (
    Conn,
    StreamConn,
    SyncConn,
    conn_dependency,
    get_conn,
    get_stream_conn,
    get_sync_conn,
)
from ._lifespan import PoolLifespan, Pools, PoolSource, PoolStartupError, WiringError, get_pools
from ._read import (
    ClusterLifespan,
    ReadConn,
    StickyAfterWrite,
    SyncReadConn,
    get_read_conn,
    get_sync_read_conn,
    read_conn_dependency,
)
from ._router import pool_router

__all__ = [
    "ClusterLifespan",
    "Conn",
    "PoolLifespan",
    "PoolSource",
    "PoolStartupError",
    "Pools",
    "ReadConn",
    "StickyAfterWrite",
    "StreamConn",
    "SyncConn",
    "SyncReadConn",
    "WiringError",
    "conn_dependency",
    "get_conn",
    "get_pools",
    "get_read_conn",
    "get_stream_conn",
    "get_sync_conn",
    "get_sync_read_conn",
    "pool_router",
    "read_conn_dependency",
]
