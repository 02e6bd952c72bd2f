"""The fast path of `def` routes: borrow, run, and commit or roll back in the route's own thread.

A sync dependency costs FastAPI a thread hop to enter and, for its cleanup, another one
to exit, on top of the hop that runs the `def` route. So when a `def` route takes
SyncConn only as its own parameter (no sub-dependency asks for it), its `dependant.call`
(what FastAPI's request handler calls, read on every request) is replaced by a wrapper
around the same endpoint: the dependency, on the event loop, hands over a `Pending`
placeholder, and the wrapper, already in the route's thread, swaps in a borrowed
connection and runs the endpoint; if the endpoint raises, it rolls back and returns the
connection there. A normal return is committed there too, like an inline
`with pool.connection()`, once FastAPI's own serialization of the answer was run ahead and
passed (_preflight.py) and the request is not being cancelled: a 500 from FastAPI's
serialization, or a request cancelled while the thread ran (uvicorn's graceful-shutdown
timeout), must write nothing. Otherwise the `Pending` commits, an exit callback of
FastAPI's function stack like every other lease: after serialization, before the response
is sent. `route.endpoint` stays the user's function. Any other shape keeps the general path.

The pre-flight stands for all that FastAPI does between the endpoint's return and the
response only if nothing else runs there. Other code can still fail the request into a 500
after the endpoint returned: a dependency with `Depends(scope="function")` (its cleanup
runs before the response), another poolkit connection's lease (its commit), a route class
whose own `get_route_handler` adds code around FastAPI's. Such a route still borrows in its
thread, but commits through the `Pending` once the rest of the function stack has run,
exactly as the general path does (_deps._end_last): a failure there rolls back.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable
from types import TracebackType
from typing import Any

from fastapi.routing import APIRoute
from psycopg import Connection

from poolkit import Pool

from ._lease import KINDS, UNAVAILABLE, Endpoint, SyncLease, borrow_sync, unavailable
from ._lifespan import WiringError
from ._preflight import Verdict, preflight_for

_WRAPPED = "__poolkit_sync_route__"


class Pending:
    """What a SyncConn parameter holds until the route's wrapper swaps in the connection.

    Also an async exit callback of FastAPI's function stack: it ends the lease (commit or
    rollback) if the wrapper borrowed and did not end it.
    """

    __slots__ = ("ep", "lease", "pool", "retry_after", "tag", "task")

    def __init__(self, pool: Pool[Any], tag: str, ep: Endpoint, retry_after: int) -> None:
        self.pool = pool
        self.tag = tag
        self.ep = ep
        self.retry_after = retry_after
        self.lease: SyncLease | None = None
        # The request's task (made on the event loop): the route's thread reads whether it
        # is being cancelled before it commits.
        try:
            self.task: asyncio.Task[Any] | None = asyncio.current_task()
        except RuntimeError:
            self.task = None  # not asyncio (trio): the commit waits for the exit callback

    def borrow(self) -> Connection[Any]:
        lease = self.lease
        if lease is None:
            try:
                conn = borrow_sync(self.pool, self.tag, self.ep)
            except UNAVAILABLE as exc:
                raise unavailable(self.pool, exc, self.retry_after) from None
            lease = self.lease = SyncLease(self.pool, conn, self.retry_after)
        return lease.conn

    async def __call__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease = self.lease
        if lease is not None and not lease.done:
            await lease(exc_type, exc, tb)

    def __getattr__(self, name: str) -> Any:
        # Only reached if FastAPI called the endpoint without our wrapper.
        raise WiringError(
            f"SyncConn placeholder used directly ({name!r}) in {self.ep.where()}: "
            "poolkit_fastapi's route wrapper did not run; please report this"
        )


def install(route: Any) -> bool:
    """Wrap `route`'s endpoint call if the route can use the fast path; True if it does."""
    dependant: Any = getattr(route, "dependant", None)
    call = getattr(dependant, "call", None)
    if call is None:
        return False
    if getattr(call, _WRAPPED, False):
        return True
    endpoint = getattr(route, "endpoint", None)
    if (
        call is not endpoint
        or not inspect.isfunction(call)
        or inspect.iscoroutinefunction(call)
        or inspect.isgeneratorfunction(call)
        or inspect.isasyncgenfunction(call)
        or not _only_direct(dependant)
    ):
        return False
    preflight = None if _fails_late(route, dependant) else preflight_for(route)
    dependant.call = _wrapper(call, preflight)
    return True


def _fails_late(route: Any, dependant: Any) -> bool:
    """True if code other than FastAPI's serialization runs between the endpoint's return
    and the response, and may fail it: then the commit waits for that code (see above)."""
    # An included route runs as an inclusion context (route_of), built by the original
    # route's class.
    original = getattr(route, "original_route", route)
    if getattr(type(original), "get_route_handler", None) is not APIRoute.get_route_handler:
        return True
    todo = list(dependant.dependencies)
    while todo:
        dep = todo.pop()
        if getattr(dep, "scope", None) == "function":
            return True  # (only a `yield` dependency's cleanup uses it; cheap to be sure)
        call = dep.call
        # poolkit's other dependencies end their leases on the function stack too.
        module = getattr(call, "__module__", None) or ""
        if module.startswith("poolkit_fastapi") and not _is_sync_conn(call):
            return True
        todo.extend(dep.dependencies)
    return False


def _is_sync_conn(call: Any) -> bool:
    kind = KINDS.get(call)
    return kind is not None and kind.sync and not kind.stream


def _only_direct(dependant: Any) -> bool:
    """True if SyncConn appears among the endpoint's own parameters and nowhere deeper."""
    direct = False
    for dep in dependant.dependencies:
        if _is_sync_conn(dep.call):
            direct = True
            if dep.dependencies:
                return False
            continue
        todo = list(dep.dependencies)
        while todo:
            sub = todo.pop()
            if _is_sync_conn(sub.call):
                return False
            todo.extend(sub.dependencies)
    return direct


def _wrapper(endpoint: Any, preflight: Callable[[Any], Verdict] | None) -> Any:
    @functools.wraps(endpoint)
    def route(**values: Any) -> Any:
        pending: list[Pending] = []
        try:
            for key, value in values.items():
                if type(value) is Pending:
                    values[key] = value.borrow()
                    if value not in pending:
                        pending.append(value)
            result = endpoint(**values)
        except BaseException as exc:
            # Rolled back right here, saving the exit callback its thread hop.
            _end_all(pending, exc)
            raise
        if len(pending) == 1 and preflight is not None:
            p = pending[0]
            lease = p.lease
            task = p.task
            # (cancelling(): a plain read of the task's counter, safe from this thread)
            if lease is not None and task is not None and not task.cancelling():
                ok, answer = preflight(result)
                if ok:
                    lease.end(None)  # a commit that fails raises its 503/500 HTTPException
                    return answer
        return result

    setattr(route, _WRAPPED, True)
    return route


def _end_all(pending: list[Pending], exc: BaseException) -> None:
    """Roll back every lease, last borrowed first; the first error raised wins."""
    error: BaseException | None = None
    for p in reversed(pending):
        if p.lease is None:
            continue
        try:
            p.lease.end(exc if error is None else error)
        except BaseException as ex:
            error = error or ex
    if error is not None:
        raise error
