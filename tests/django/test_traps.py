"""The four traps of Django's native pool: each scenario runs on Django's own backend
(ENGINE "django.db.backends.postgresql" with OPTIONS["pool"]) and on poolkit_django, and
the test asserts the native failure as well as poolkit's correct behaviour."""

from __future__ import annotations

import gc
import json
import logging
import re
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.db import OperationalError, connections

from poolkit_django import pools
from tests._helpers import wait_until
from tests.django._support import (
    call_json,
    dbname,
    extra_database,
    gunicorn,
    scratch_database,
)

NATIVE, POOLKIT = "native", "poolkit"


@pytest.fixture
def db_access(django_db_blocker: Any) -> Iterator[None]:
    """Database access for tests that bring their own databases (not pytest-django's)."""
    with django_db_blocker.unblock():
        yield


@pytest.fixture
def scratch(db_access: None, admin_dsn: str, dsn: str) -> Iterator[str]:
    with scratch_database(admin_dsn, dsn) as url:
        yield url


def _query(alias: str, sql: str = "SELECT pg_backend_pid()") -> Any:
    with connections[alias].cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0]


def _can_borrow(alias: str) -> bool:
    """Whether the main thread gets a connection from the alias's pool (timeout: 1 s)."""
    try:
        _query(alias)
    except OperationalError:  # Django's wrapper around PoolTimeout
        return False
    finally:
        connections[alias].close()
    return True


# -- trap 1: helper threads ------------------------------------------------------------


def _query_in_helper(alias: str) -> int:
    """Runs in a helper thread and, like most such code, never closes its connection."""
    return int(_query(alias))


def _helper_thread_scenario(alias: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # A plain thread that queries and ends.
    t = threading.Thread(target=_query_in_helper, args=(alias,))
    t.start()
    t.join()
    with warnings.catch_warnings():
        # psycopg warns when the native pool's lost connection is garbage-collected.
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    out["after_thread_exit"] = _can_borrow(alias)
    # A ThreadPoolExecutor thread: it stays alive, and so does its connection.
    executor = ThreadPoolExecutor(1, thread_name_prefix="helper")
    try:
        executor.submit(_query_in_helper, alias).result()
    except OperationalError:
        out["executor_failed_to_borrow"] = True
    out["while_executor_alive"] = _can_borrow(alias)
    executor.shutdown(wait=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    out["after_executor_shutdown"] = _can_borrow(alias)
    return out


def test_trap1_connection_borrowed_in_a_helper_thread_comes_back(
    scratch: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Django's native pool: a connection borrowed in a thread is never returned (nothing
    closes it at the end of the thread), so every helper thread costs a slot for good.
    poolkit: the slot comes back when the thread ends, and while a live thread holds it
    the leak tracker logs the borrow site (the helper function, not Django's internals)."""
    pool = {"min_size": 1, "max_size": 1, "timeout": 1}
    with extra_database("trap1_native", scratch, engine=NATIVE, pool=pool):
        native = _helper_thread_scenario("trap1_native")
    assert native == {
        "after_thread_exit": False,
        "executor_failed_to_borrow": True,
        "while_executor_alive": False,
        "after_executor_shutdown": False,
    }

    caplog.set_level(logging.INFO, logger="poolkit")
    with extra_database(
        "trap1",
        scratch,
        engine=POOLKIT,
        pool={**pool, "leak_threshold": 0.2, "leak_capture_stack": True},
    ):
        ours = _helper_thread_scenario("trap1")
        assert ours == {
            "after_thread_exit": True,
            "while_executor_alive": False,  # a live thread may keep its connection...
            "after_executor_shutdown": True,  # ...until it ends
        }
        assert pools()["trap1"].stats()["in_use"] == 0

        # ...and the leak tracker says who holds it meanwhile.
        executor = ThreadPoolExecutor(1, thread_name_prefix="holder")
        try:
            executor.submit(_query_in_helper, "trap1").result()
            record = wait_until(
                lambda: next(
                    (
                        r
                        for r in caplog.records
                        if "out for" in r.message and "'holder" in r.message
                    ),
                    None,
                ),
                timeout=5,
                what="a leak warning",
            )
        finally:
            executor.shutdown(wait=True)
        assert record.levelno == logging.WARNING
        assert f"{Path(__file__).name}:" in record.message
        assert re.search(r" in _query (\[thread: holder_\d+\] )?by thread 'holder", record.message)
        stack_at_borrow = record.message.partition("Stack at borrow:")[2]
        assert "in _query_in_helper" in stack_at_borrow
        returned = [r.message for r in caplog.records if "ended without closing" in r.message]
        assert returned and "alias 'trap1'" in returned[-1]
        assert pools()["trap1"].stats()["in_use"] == 0


def test_trap1_garbage_collected_wrapper_gives_its_slot_back(
    scratch: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A DatabaseWrapper dropped without close() (a `connection.copy()`, a thread-local of a
    thread gone without the exit hook): once it is garbage-collected the pool gets the slot
    back and says where the connection was borrowed. The native pool loses the slot."""
    pool = {"min_size": 0, "max_size": 1, "timeout": 1}
    with extra_database("gc_native", scratch, engine=NATIVE, pool=pool):
        _abandon_a_copy("gc_native")
        assert not _can_borrow("gc_native")

    with extra_database("gc", scratch, engine=POOLKIT, pool=pool):
        _abandon_a_copy("gc")
        wait_until(lambda: pools()["gc"].stats()["leaks_reclaimed"] == 1, timeout=5)
        assert _can_borrow("gc")
    (record,) = [r for r in caplog.records if "garbage-collected" in r.message]
    assert "in _abandon_a_copy" in record.message


def _abandon_a_copy(alias: str) -> None:
    copy = connections[alias].copy()
    with copy.cursor() as cur:
        cur.execute("SELECT 1")
    del copy, cur
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # psycopg: "deleted while still open"
        gc.collect()


# -- trap 2: the test database ---------------------------------------------------------


def _test_database_scenario(alias: str) -> dict[str, Any]:
    wrapper = connections[alias]
    original = _query(alias, "SELECT current_database()")  # the pool exists before the test DB
    wrapper.close()
    old_name = wrapper.settings_dict["NAME"]
    test_name = wrapper.creation.create_test_db(verbosity=0, serialize=False)
    out = {"original": original, "test_name": test_name}
    out["in_test"] = _query(alias, "SELECT current_database()")
    # A helper thread still holds a connection to the test database at teardown.
    executor = ThreadPoolExecutor(1)
    executor.submit(_query_in_helper, alias).result()
    wrapper.close()
    try:
        wrapper.creation.destroy_test_db(old_name, verbosity=0)
        out["teardown"] = "ok"
    except Exception as exc:
        out["teardown"] = str(exc)
    finally:
        executor.submit(lambda: connections[alias].close()).result()
        executor.shutdown(wait=True)
    return out


def test_trap2_pool_follows_the_test_database(scratch: str, admin_dsn: str) -> None:
    """Django's native pool is built once per alias: created before the test runner renames
    the database, it keeps lending connections to the original one (migrations and tests
    then run against it). poolkit rebuilds the pool when NAME or connection settings
    change, and closes every connection to the test database before dropping it."""
    with extra_database("trap2_native", scratch, engine=NATIVE):
        native = _test_database_scenario("trap2_native")
    assert native["in_test"] == dbname(scratch) != native["test_name"]

    with extra_database("trap2", scratch, engine=POOLKIT):
        ours = _test_database_scenario("trap2")
    assert ours["original"] == dbname(scratch)
    assert ours["in_test"] == ours["test_name"] == f"test_{dbname(scratch)}"
    assert ours["teardown"] == "ok"
    with psycopg.connect(admin_dsn) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname = %s", (ours["test_name"],)
        ).fetchone()
    assert left == (0,)


def test_trap2_native_teardown_fails_while_a_thread_holds_a_connection(scratch: str) -> None:
    """The other half of trap 2 on Django's native pool, with a pool built for the test
    database: close_pool() only closes idle connections, so the DROP fails."""
    with extra_database("trap2b_native", scratch, engine=NATIVE):
        wrapper = connections["trap2b_native"]
        old_name = wrapper.settings_dict["NAME"]
        wrapper.creation.create_test_db(verbosity=0, serialize=False)
        executor = ThreadPoolExecutor(1)
        executor.submit(_query_in_helper, "trap2b_native").result()
        try:
            with pytest.raises(Exception, match="being accessed by other users"):
                wrapper.creation.destroy_test_db(old_name, verbosity=0)
        finally:
            executor.submit(lambda: connections["trap2b_native"].close()).result()
            executor.shutdown(wait=True)
            wrapper.creation.destroy_test_db(old_name, verbosity=0)


# -- trap 3: session state -------------------------------------------------------------


def _session_scenario(alias: str) -> tuple[dict[str, Any], dict[str, Any]]:
    first = call_json("/session/set", db=alias)
    second = call_json("/session/show", db=alias)
    return first, second


def test_trap3_session_state_does_not_leak_between_requests(scratch: str) -> None:
    """Django's native pool returns connections as they are: `SET search_path`,
    `statement_timeout` or `TIME ZONE` run by one request are in force in the next one.
    poolkit resets the session (RESET ALL, pipelined) when the connection comes back; the
    time zone Django configured survives the reset (it travels in the startup packet)."""
    pool = {"min_size": 1, "max_size": 1}  # one connection: the second request reuses it
    with extra_database("trap3_native", scratch, engine=NATIVE, pool=pool):
        first, second = _session_scenario("trap3_native")
    assert first["backend"] == second["backend"]
    assert second["search_path"] == "pg_catalog, public"
    assert second["statement_timeout"] == "4321ms"
    assert second["TimeZone"] == "Asia/Tokyo"

    with extra_database("trap3", scratch, engine=POOLKIT, pool=pool):
        first, second = _session_scenario("trap3")
        assert pools()["trap3"].stats()["resets"] >= 1
    assert first["backend"] == second["backend"]  # the same connection, reused...
    assert second["search_path"] == '"$user", public'  # ...and reset
    assert second["statement_timeout"] == "0"
    assert second["TimeZone"] == "UTC"


def test_reset_discard_all_also_covers_set_config(scratch: str) -> None:
    """`set_config()` changes the session without a SET command tag, which reset="auto"
    cannot see; reset="discard_all" (documented for such code) resets every borrow."""
    pool = {"min_size": 1, "max_size": 1, "reset": "discard_all"}
    with extra_database("discard", scratch, pool=pool):
        call_json("/session/set_config", db="discard")
        second = call_json("/session/show", db="discard")
    assert second["search_path"] == '"$user", public'
    assert second["TimeZone"] == "UTC"


# -- trap 4: fork ----------------------------------------------------------------------


def _fork_scenario(url: str, engine: str, tmp_path: Path) -> list[str]:
    """gunicorn --preload, 2 sync workers; the master queries at import. Returns the problems."""
    master_file = tmp_path / f"master-{engine}.json"
    server = gunicorn(
        url,
        tmp_path / f"gunicorn-{engine}.log",
        workers=2,
        app="tests.django.project.preload:application",
        extra_args=["--preload", "-c", "tests/django/project/gunicorn_preload.py"],
        PK_ENGINE=engine,
        PK_POOL=json.dumps({"min_size": 2, "max_size": 4, "timeout": 5}),
        PK_MASTER_FILE=str(master_file),
    )
    problems: list[str] = []
    seen: dict[int, set[int]] = {}
    lock = threading.Lock()

    def client() -> None:
        for _ in range(15):
            try:
                status, _, body = server.get("/sleep?s=0.01", timeout=10)
            except OSError as exc:
                with lock:
                    problems.append(f"request failed: {exc!r}")
                continue
            with lock:
                if status != 200:
                    problems.append(f"HTTP {status}")
                else:
                    data = json.loads(body)
                    seen.setdefault(data["pid"], set()).add(data["backend"])

    with server:
        master = json.loads(master_file.read_text())
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    at_exit = json.loads(Path(f"{master_file}.exit").read_text())
    if len(seen) != 2:
        problems.append(f"expected both workers to answer, got {sorted(seen)}")
    workers = list(seen.values())
    if len(workers) == 2 and workers[0] & workers[1]:
        problems.append(f"workers share backends {sorted(workers[0] & workers[1])}")
    if any(master["backend"] in w for w in workers):
        problems.append(f"a worker used the master's backend {master['backend']}")
    if at_exit != {"backend": master["backend"]}:
        problems.append(f"the master's own connection broke: {at_exit}")
    if engine == POOLKIT:
        assert not problems, f"{problems}\n{server.logs()}"
    return problems


def test_trap4_fork_gunicorn_preload(
    db_access: None, admin_dsn: str, dsn: str, tmp_path: Path
) -> None:
    """gunicorn --preload with 2 workers, the master holding a connection at fork.

    Django's native pool is copied into each worker with the master's sockets: both
    workers (and the master) talk over the same backends. poolkit's pool rebuilds itself
    in each worker, the backend drops the inherited connection, and the master's
    connection still works at shutdown."""
    with scratch_database(admin_dsn, dsn) as url:
        ours = _fork_scenario(url, POOLKIT, tmp_path)
        native = _fork_scenario(url, NATIVE, tmp_path)
    assert ours == []
    # Typically: "workers share backends [...]", "a worker used the master's backend ...".
    assert native, "Django's native pool was expected to share connections across the fork"
