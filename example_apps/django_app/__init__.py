"""A small Django shop on poolkit_django; ``python -m example_apps.django_app`` serves it."""
