"""PostgreSQL connection pools for psycopg 3, with FastAPI and Django integrations."""

from ._config import PoolConfig, mask_conninfo
from ._errors import ConfigError, PoolClosed, PoolkitError, PoolTimeout, TooManyRequests
from ._pool import Pool
from ._pool_async import AsyncPool
from ._stats import PoolStats

__all__ = [
    "AsyncPool",
    "ConfigError",
    "Pool",
    "PoolClosed",
    "PoolConfig",
    "PoolStats",
    "PoolTimeout",
    "PoolkitError",
    "TooManyRequests",
    "mask_conninfo",
]
