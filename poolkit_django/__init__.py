"""Django integration: ENGINE "poolkit_django", middleware, health/metrics views, checks."""

from ._middleware import PoolkitMiddleware
from ._registry import get_pool, pools

__all__ = ["PoolkitMiddleware", "get_pool", "pools"]
