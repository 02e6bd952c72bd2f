"""DatabaseFeatures: PostgreSQL's, with the test skips that hold for Django's native pool only."""

from __future__ import annotations

from typing import Any

from django.db.backends.postgresql.features import DatabaseFeatures as PgFeatures
from django.utils.functional import cached_property

# Django skips these two under OPTIONS["pool"] because its pool checks connections by
# itself. poolkit_django keeps Django's per-request health check (CONN_HEALTH_CHECKS) for a
# connection parked between requests, so they apply again.
_HEALTH_CHECK_SKIP = "Pool does implicit health checks"


class DatabaseFeatures(PgFeatures):
    @cached_property
    def django_test_skips(self) -> dict[str, set[str]]:  # type: ignore[override]
        skips: dict[str, Any] = dict(super().django_test_skips)
        skips.pop(_HEALTH_CHECK_SKIP, None)
        return skips
