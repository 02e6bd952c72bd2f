"""FastAPI's own answer serialization, run ahead in a `def` route's thread so it can commit there.

FastAPI validates and serializes a route's return value after the route returned, and a
failure there is a 500. A commit made before that would leave a write behind a 500, so the
SyncConn fast path commits in the route's thread only once this pre-flight passed: FastAPI's
`serialize_response`, with the route's settings, driven to its end in the thread (with
`is_coroutine=True` it never suspends), then the default response class's render. Waiting for
FastAPI's own serialization instead means a hop back to the event loop and another to a worker
for the commit, with the connection held all along: about 30% of a `def` route's throughput
on a pool smaller than the worker pool (bench/http_fastapi.py).

This reads FastAPI internals (`fastapi.routing.serialize_response`, the route's
`response_model_*` attributes): they live here only, and `tests/test_fastapi_wiring.py`
fails if they change. Anything unexpected makes the pre-flight say "unsure", and the route
falls back to committing after FastAPI's own serialization.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from starlette.responses import JSONResponse, Response

# The route attributes handed to serialize_response, as FastAPI's get_route_handler does.
_SETTINGS = {
    "include": "response_model_include",
    "exclude": "response_model_exclude",
    "by_alias": "response_model_by_alias",
    "exclude_unset": "response_model_exclude_unset",
    "exclude_defaults": "response_model_exclude_defaults",
    "exclude_none": "response_model_exclude_none",
}


def _serializer() -> tuple[Callable[..., Any], frozenset[str]] | None:
    try:
        from fastapi.routing import serialize_response
    except ImportError:
        return None
    return serialize_response, frozenset(inspect.signature(serialize_response).parameters)


_SERIALIZE = _serializer()


def _sets_response(dependant: Any) -> bool:
    """True if the route or a dependency takes FastAPI's `response: Response` parameter
    (whose status code and headers FastAPI adds to the answer it builds, not to one the
    route returns)."""
    todo = [dependant]
    while todo:
        dep = todo.pop()
        if getattr(dep, "response_param_name", None):
            return True
        todo.extend(dep.dependencies)
    return False


# What a pre-flight gives: whether to commit now, and the route's answer for FastAPI.
Verdict = tuple[bool, Any]


def preflight_for(route: Any) -> Callable[[Any], Verdict] | None:
    """For `route`: a function that serializes a return value as FastAPI would and says
    whether it succeeded (False also when it cannot tell), with the answer to hand FastAPI:
    the response built here when nothing else can change it (so FastAPI neither validates
    nor serializes again), else the value as returned. None if this FastAPI is not
    understood."""
    if _SERIALIZE is None:
        return None
    serialize, params = _SERIALIZE
    try:
        from fastapi.datastructures import DefaultPlaceholder
        from fastapi.utils import is_body_allowed_for_status_code

        field = route.response_field
        kwargs: dict[str, Any] = {k: getattr(route, attr) for k, attr in _SETTINGS.items()}
        response_class = route.response_class
        status_code = route.status_code
        build = not _sets_response(route.dependant)
    except (AttributeError, ImportError):
        return None
    default_class = isinstance(response_class, DefaultPlaceholder)
    if default_class:
        response_class = response_class.value
    kwargs["field"] = field
    kwargs["is_coroutine"] = True  # validate in this thread, as a coroutine endpoint would
    dump_json = "dump_json" in params and field is not None and default_class
    if "dump_json" in params:
        # FastAPI's fast path: a response model and the default class, JSON bytes at once.
        kwargs["dump_json"] = dump_json
    if not set(kwargs) <= params or "response_content" not in params:
        return None
    # Rendered here only when rendering is all the class's constructor does: the default
    # JSONResponse refuses NaN and infinities, after validation passed.
    if not dump_json and not (
        isinstance(response_class, type)
        and issubclass(response_class, JSONResponse)
        and response_class.__init__ is JSONResponse.__init__
    ):
        return None  # a response class of its own: rendering it here could do anything
    args: dict[str, Any] = {} if status_code is None else {"status_code": status_code}

    def preflight(value: Any) -> Verdict:
        if isinstance(value, Response):
            return True, value  # sent as returned (rendered in the route already)
        coro = serialize(response_content=value, **kwargs)
        try:
            coro.send(None)
        except StopIteration as done:
            content = done.value
        except Exception:
            return False, value  # FastAPI will fail the same way: its 500 rolls back
        else:
            coro.close()  # it suspended: this FastAPI works differently, let it decide
            return False, value
        try:
            if dump_json:
                response = Response(content=content, media_type="application/json", **args)
            else:
                response = response_class(content, **args)
        except Exception:
            return False, value
        if not build:
            return True, value
        # As FastAPI's request handler finishes its own (its background tasks are added to
        # a returned response by FastAPI itself).
        if not is_body_allowed_for_status_code(response.status_code):
            response.body = b""
        return True, response

    return preflight
