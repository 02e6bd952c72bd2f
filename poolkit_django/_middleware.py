"""PoolkitMiddleware: pool exhaustion becomes 503 + Retry-After, and borrows are tagged by view."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import psycopg
from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.core.signals import got_request_exception
from django.db import Error as DjangoDatabaseError
from django.http import HttpRequest, HttpResponse, HttpResponseBase

from poolkit import PoolTimeout, TooManyRequests

from ._lending import current_tag

logger = logging.getLogger("poolkit.django")

_EXHAUSTED = "_poolkit_exhausted"
_set_tag = current_tag.set
_reset_tag = current_tag.reset


def exhaustion(exc: BaseException | None) -> BaseException | None:
    """The PoolTimeout/TooManyRequests behind `exc` (Django wraps it in OperationalError).

    None when the pool error happened while another database error was being handled,
    e.g. Django restoring autocommit after a failed COMMIT: the write's outcome is then
    unknown, and a 503 would invite the client to write it twice.
    """
    chain: list[BaseException] = []
    while exc is not None and len(chain) < 10:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for i, err in enumerate(chain):
        if isinstance(err, PoolTimeout | TooManyRequests):
            earlier = chain[i + 1 :]
            if any(_is_db_error(e) for e in earlier):
                return None
            return err
    return None


def _is_db_error(exc: BaseException) -> bool:
    if isinstance(exc, PoolTimeout | TooManyRequests):
        return False
    return isinstance(exc, psycopg.Error | DjangoDatabaseError)


def _remember_exhaustion(sender: Any, request: HttpRequest | None = None, **kwargs: Any) -> None:
    # Runs inside Django's exception handling, for exceptions raised outside the view (in
    # another middleware, say), which process_exception() never sees.
    found = exhaustion(sys.exc_info()[1])
    if found is not None and request is not None:
        setattr(request, _EXHAUSTED, found)


def connect_signals() -> None:
    got_request_exception.connect(_remember_exhaustion, dispatch_uid="poolkit_django.exhaustion")


class PoolkitMiddleware:
    """Put it first in MIDDLEWARE.

    - A request that cannot get a connection in time (PoolTimeout) or finds too many
      requests already waiting (TooManyRequests, from ``max_waiting``) gets
      ``503 Service Unavailable`` with ``Retry-After`` instead of a 500.
    - Connections borrowed while a view runs are tagged with its name, so
      ``pool.hold_time_by_tag()`` and the metrics show hold time per view.
    """

    sync_capable = True
    async_capable = True
    retry_after = 1  # seconds; a subclass may change it

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)
        connect_signals()

    def __call__(self, request: HttpRequest) -> Any:
        if self._async:
            return self.__acall__(request)
        token = _set_tag(None)
        try:
            response = self.get_response(request)
        finally:
            _reset_tag(token)
        if response.status_code == 500:
            return self._check(request, response)
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        token = _set_tag(None)
        try:
            response: HttpResponseBase = await self.get_response(request)
        finally:
            _reset_tag(token)
        if response.status_code == 500:
            return self._check(request, response)
        return response

    def process_view(
        self,
        request: HttpRequest,
        view_func: Callable[..., Any],
        view_args: Any,
        view_kwargs: Any,
    ) -> None:
        match = request.resolver_match
        if match is not None:
            _set_tag(match.view_name or match._func_path)

    def process_exception(
        self, request: HttpRequest, exception: Exception
    ) -> HttpResponseBase | None:
        found = exhaustion(exception)
        return None if found is None else self.unavailable(request, found)

    def _check(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        found = getattr(request, _EXHAUSTED, None)
        return response if found is None else self.unavailable(request, found)

    def unavailable(self, request: HttpRequest, exc: BaseException) -> HttpResponseBase:
        """The 503 response; override to render your own page."""
        logger.warning("503 for %s %s: %s", request.method, request.path, exc)
        response = HttpResponse(
            "Service Unavailable: every database connection is busy, retry shortly.\n",
            status=503,
            content_type="text/plain; charset=utf-8",
        )
        response["Retry-After"] = str(self.retry_after)
        return response
