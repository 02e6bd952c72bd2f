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

A value that serializing uses up (a generator, `map()`, a cursor, in the value or in its
lists and dicts) can be serialized once only. When FastAPI still serializes after the
pre-flight (a `response: Response` parameter), or when the answer itself is an iterator,
the pre-flight leaves such a value alone: FastAPI would otherwise serialize what is left of
it, an empty list. When the pre-flight failed on one nested in the answer, it raises that
failure itself rather than hand FastAPI the emptied value, which would then pass (a 200
with `[]`, and a commit, where FastAPI answers 500); that error lacks the endpoint context
FastAPI's own would name (file, line, path), seen only by a handler of the app's own.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
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


_CONTAINERS = (list, tuple, set, frozenset)


def _single_use(value: Any) -> bool:
    """True if `value` holds an iterator (itself, or in its lists, tuples, sets, dict values
    or pydantic models' fields), which FastAPI's serialization walks once and leaves empty.
    Walked only when a value may be serialized twice: on the fast path, a value is not."""
    todo = [value]
    seen: set[int] = set()  # a value holding itself (FastAPI fails on it) is walked once
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, _CONTAINERS):
            todo.extend(item)
        elif isinstance(item, Iterator):
            return True
        elif hasattr(item, "__pydantic_fields__") and not isinstance(item, type):
            todo.extend(getattr(item, "__dict__", {}).values())  # fields typed Iterator, Any
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
        if isinstance(value, Iterator) or (not build and _single_use(value)):
            # FastAPI serializes it after us: it must get it whole. (A generator answer,
            # the usual one-pass shape, is a cheap check: left to FastAPI, its failure is
            # FastAPI's own, the endpoint named in the error.)
            return False, value
        # Past this point a one-pass value is possible only when we build the answer
        # (`not build` walked it above): the failure paths below walk it only then.
        coro = serialize(response_content=value, **kwargs)
        try:
            coro.send(None)
        except StopIteration as done:
            content = done.value
        except Exception:
            if build and _single_use(value):
                raise  # what FastAPI would raise; its rerun would pass on the emptied value
            return False, value  # FastAPI will fail the same way: its 500 rolls back
        else:
            coro.close()  # it suspended: this FastAPI works differently, let it decide
            if build and _single_use(value):
                raise RuntimeError(
                    "poolkit_fastapi: this FastAPI's serialize_response suspended on a "
                    "one-pass answer (a generator?) it had started to consume; please report"
                )
            return False, value
        try:
            if dump_json:
                response = Response(content=content, media_type="application/json", **args)
            else:
                response = response_class(content, **args)
        except Exception:
            if build and _single_use(value):
                raise  # as above: FastAPI's own rendering of the full value fails so
            return False, value
        if not build:
            return True, value
        # As FastAPI's request handler finishes its own (its background tasks are added to
        # a returned response by FastAPI itself).
        if not is_body_allowed_for_status_code(response.status_code):
            response.body = b""
        return True, response

    return preflight
