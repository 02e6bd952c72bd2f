from django.urls import include, path

from . import views

urlpatterns = [
    path("ping", views.ping),
    path("pid", views.pid),
    path("session/set", views.session_set),
    path("session/set_config", views.session_set_config),
    path("session/show", views.session_show),
    path("db_error", views.db_error),
    path("cursor/left_open", views.cursor_left_open),
    path("cursors", views.cursors),
    path("sleep", views.sleep),
    path("wait_between", views.wait_between),
    path("busy_between", views.busy_between),
    path("notes", views.notes, name="notes"),
    path("notes/atomic", views.notes_atomic),
    path("anotes", views.anotes),
    path("stats", views.stats),
    path("poolkit/", include("poolkit_django.urls")),
]
