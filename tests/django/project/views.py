"""Views the tests drive through Django's handlers and real servers."""

from __future__ import annotations

import os
import threading
import time

from django.db import DatabaseError, connections, transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from poolkit_django import pools

from .testapp.models import Note


def _alias(request: HttpRequest) -> str:
    return request.GET.get("db", "default")


def ping(request: HttpRequest) -> JsonResponse:
    """No database: for readiness polling."""
    return JsonResponse({"pid": os.getpid()})


def pid(request: HttpRequest) -> JsonResponse:
    alias = _alias(request)
    with connections[alias].cursor() as cur:
        cur.execute("SELECT pg_backend_pid(), current_database()")
        backend, db = cur.fetchone()
    return JsonResponse({"pid": os.getpid(), "backend": backend, "db": db, "alias": alias})


def session_set(request: HttpRequest) -> JsonResponse:
    """Change session state the way application code does, then leave it behind."""
    with connections[_alias(request)].cursor() as cur:
        cur.execute("SET search_path TO pg_catalog, public")
        cur.execute("SET statement_timeout = '4321ms'")
        cur.execute("SET TIME ZONE 'Asia/Tokyo'")
        cur.execute("SELECT pg_backend_pid()")
        (backend,) = cur.fetchone()
    return JsonResponse({"backend": backend})


def session_set_config(request: HttpRequest) -> JsonResponse:
    """Change session state with set_config(), which no SET command tag reveals."""
    with connections[_alias(request)].cursor() as cur:
        cur.execute("SELECT set_config('search_path', 'pg_catalog', false), pg_backend_pid()")
        _, backend = cur.fetchone()
    return JsonResponse({"backend": backend})


def session_show(request: HttpRequest) -> JsonResponse:
    with connections[_alias(request)].cursor() as cur:
        cur.execute(
            "SELECT current_setting('search_path'), current_setting('statement_timeout'),"
            " current_setting('TimeZone'), pg_backend_pid()"
        )
        search_path, statement_timeout, tz, backend = cur.fetchone()
    return JsonResponse(
        {
            "search_path": search_path,
            "statement_timeout": statement_timeout,
            "TimeZone": tz,
            "backend": backend,
        }
    )


def db_error(request: HttpRequest) -> JsonResponse:
    """A query that fails (not a DataError or IntegrityError: Django sets errors_occurred),
    caught by the view, which answers normally."""
    try:
        with connections[_alias(request)].cursor() as cur:
            cur.execute("SELECT * FROM no_such_table")
    except DatabaseError as exc:
        return JsonResponse({"error": type(exc).__name__})
    return JsonResponse({"error": None})


def cursor_left_open(request: HttpRequest) -> JsonResponse:
    """Read the first row of a server-side cursor (what QuerySet.iterator() uses) and drop
    it without close(): in autocommit it is declared WITH HOLD, so it outlives the request
    in the session."""
    cur = connections[_alias(request)].chunked_cursor()
    cur.execute("SELECT generate_series(1, 1000)")
    (first,) = cur.fetchone()
    return JsonResponse({"first": first})


def cursors(request: HttpRequest) -> JsonResponse:
    """The cursors the session holds (pg_cursors, this query's own portal left out)."""
    with connections[_alias(request)].cursor() as cur:
        cur.execute("SELECT name FROM pg_cursors WHERE name <> '' ORDER BY name")
        names = [name for (name,) in cur.fetchall()]
    return JsonResponse({"cursors": names})


def sleep(request: HttpRequest) -> JsonResponse:
    seconds = float(request.GET.get("s", "0.05"))
    with connections[_alias(request)].cursor() as cur:
        cur.execute("SELECT pg_sleep(%s), pg_backend_pid()", [seconds])
        _, backend = cur.fetchone()
    return JsonResponse({"pid": os.getpid(), "backend": backend})


def wait_between(request: HttpRequest) -> JsonResponse:
    """A query, a wait on something that is not the database (?s= seconds), a query."""
    with connections[_alias(request)].cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        (first,) = cur.fetchone()
    time.sleep(float(request.GET.get("s", "0.02")))
    with connections[_alias(request)].cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        (second,) = cur.fetchone()
    return JsonResponse({"pid": os.getpid(), "backends": [first, second]})


def busy_between(request: HttpRequest) -> JsonResponse:
    """A query, then the pool's only connection taken (as by another request), then a
    query: with release="transaction" the second one times out borrowing again."""
    alias = _alias(request)
    with connections[alias].cursor() as cur:
        cur.execute("SELECT 1")
    pool = pools()[alias]
    taken = pool.getconn()
    try:
        with connections[alias].cursor() as cur:
            cur.execute("SELECT 2")
    finally:
        pool.putconn(taken)
    return JsonResponse({})


@csrf_exempt
def notes(request: HttpRequest) -> JsonResponse:
    if request.method == "POST":
        note = Note.objects.create(text=request.POST.get("text", "note"))
        return JsonResponse({"id": note.id}, status=201)
    return JsonResponse({"notes": list(Note.objects.values_list("text", flat=True))})


@csrf_exempt
def notes_atomic(request: HttpRequest) -> JsonResponse:
    """Two writes in one transaction; ?fail=1 makes the second one fail."""
    try:
        with transaction.atomic():
            Note.objects.create(text="first")
            if request.GET.get("fail"):
                raise ValueError("rollback")
            Note.objects.create(text="second")
    except ValueError:
        return JsonResponse({"rolled_back": True}, status=409)
    return JsonResponse({"count": Note.objects.count()})


async def anotes(request: HttpRequest) -> JsonResponse:
    """An async view using the ORM (sync_to_async under the hood)."""
    await Note.objects.acreate(text=f"async {threading.get_ident()}")
    count = await Note.objects.acount()
    return JsonResponse({"count": count, "pid": os.getpid()})


def stats(request: HttpRequest) -> JsonResponse:
    return JsonResponse({alias: pool.stats() for alias, pool in pools().items()})
