from django.urls import include, path

urlpatterns = [
    path("", include("example_apps.django_app.shop.urls")),
    path("poolkit/", include("poolkit_django.urls")),  # /poolkit/health, /poolkit/metrics
]
