"""PostgreSQL connection pools for psycopg 3, with FastAPI and Django integrations."""

from ._cluster import ClusterPool
from ._cluster_async import AsyncClusterPool
from ._cluster_base import ClusterStats, HostStats
from ._config import PoolConfig, mask_conninfo
from ._dashboard import dashboard_html, dashboard_snapshot
from ._dashboard_history import DashboardHistory
from ._errors import (
    ConfigError,
    ConnectFailed,
    ConnectionReturned,
    PoolClosed,
    PoolkitError,
    PoolTimeout,
    TooManyRequests,
)
from ._metrics import render_prometheus
from ._otel import instrument_otel
from ._pool import Pool
from ._pool_async import AsyncPool
from ._stats import PoolStats
from ._version import __version__ as __version__

__all__ = [
    "AsyncClusterPool",
    "AsyncPool",
    "ClusterPool",
    "ClusterStats",
    "ConfigError",
    "ConnectFailed",
    "ConnectionReturned",
    "DashboardHistory",
    "HostStats",
    "Pool",
    "PoolClosed",
    "PoolConfig",
    "PoolStats",
    "PoolTimeout",
    "PoolkitError",
    "TooManyRequests",
    "dashboard_html",
    "dashboard_snapshot",
    "instrument_otel",
    "mask_conninfo",
    "render_prometheus",
]
