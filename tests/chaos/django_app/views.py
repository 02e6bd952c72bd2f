"""This worker's pool stats with its pid (the example's health view names no worker), and a
read that goes where the router sends it."""

from __future__ import annotations

import os

from django.db import connections, router
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

import poolkit_django
from example_apps.django_app.shop.models import Product


@require_GET
def pool(request: HttpRequest) -> JsonResponse:
    """pool.stats() of this worker's pools, borrowing nothing."""
    stats = {alias: p.stats() for alias, p in poolkit_django.pools().items()}
    return JsonResponse({"pid": os.getpid(), "pools": stats})


@require_GET
def read(request: HttpRequest) -> JsonResponse:
    """Count the products where ReplicaRouter sends reads; say which server answered."""
    alias = router.db_for_read(Product)  # once: the answer may change within the request
    rows = Product.objects.using(alias).count()
    port = connections[alias].connection.info.port
    return JsonResponse({"rows": rows, "alias": alias, "port": port})
