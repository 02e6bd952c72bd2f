"""The test project's only app."""

from django.apps import AppConfig


class TestAppConfig(AppConfig):
    name = "tests.django.project.testapp"
    label = "testapp"
