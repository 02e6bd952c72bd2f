"""A small Django shop on poolkit_django: ``python -m example_apps.django_app`` migrates and serves it."""
