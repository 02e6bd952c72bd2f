"""This worker's pool stats with its pid: the example's health view names no worker."""

from __future__ import annotations

import os

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

import poolkit_django


@require_GET
def pool(request: HttpRequest) -> JsonResponse:
    """pool.stats() of this worker's pools, borrowing nothing."""
    stats = {alias: p.stats() for alias, p in poolkit_django.pools().items()}
    return JsonResponse({"pid": os.getpid(), "pools": stats})
