"""Django integration: ENGINE "poolkit_django", middleware, health/metrics views, checks."""

from poolkit._extras import require_extra

require_extra("poolkit_django", "django", ("django", "asgiref"))

# The imports below need the extra: they run after the check on purpose.
from ._middleware import PoolkitMiddleware
from ._registry import get_pool, pools

__all__ = ["PoolkitMiddleware", "get_pool", "pools"]
