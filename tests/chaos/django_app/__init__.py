"""The Django example shop (example_apps/django_app) configured for the chaos suite."""
