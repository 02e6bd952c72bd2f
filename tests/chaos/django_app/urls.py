"""The example shop's URLs, plus the per-worker pool stats the suite polls and a routed read."""

from django.urls import include, path

from . import views

urlpatterns = [
    path("chaos/pool", views.pool),
    path("chaos/read", views.read),
    path("", include("example_apps.django_app.urls")),
]
