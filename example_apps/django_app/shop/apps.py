from django.apps import AppConfig


class ShopConfig(AppConfig):
    name = "example_apps.django_app.shop"
    label = "shop"
    # Pinned here too, so the migrations agree with the models whatever the project sets.
    default_auto_field = "django.db.models.BigAutoField"
