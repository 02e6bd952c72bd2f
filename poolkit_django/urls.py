"""URLs for health, metrics and dashboard: ``path("poolkit/", include("poolkit_django.urls"))``."""

from __future__ import annotations

from django.urls import path

from . import _views

app_name = "poolkit"

urlpatterns = [
    path("health", _views.health, name="health"),
    path("metrics", _views.metrics, name="metrics"),
    # Off (404) unless settings.POOLKIT_DASHBOARD is True.
    path("dashboard/", _views.dashboard, name="dashboard"),
    path("dashboard/data", _views.dashboard_data, name="dashboard-data"),
]
