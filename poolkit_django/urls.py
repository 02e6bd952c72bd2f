"""URLs for the health and metrics views: ``path("poolkit/", include("poolkit_django.urls"))``."""

from __future__ import annotations

from django.urls import path

from . import _views

app_name = "poolkit"

urlpatterns = [
    path("health", _views.health, name="health"),
    path("metrics", _views.metrics, name="metrics"),
]
