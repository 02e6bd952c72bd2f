"""poolkit as SQLAlchemy's connection source: one pool shared by an engine and direct use."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from poolkit import Pool, PoolTimeout
from tests._helpers import backend_count


@pytest.fixture
def pool(app_dsn: str) -> Iterator[Pool]:
    # close_returns=True: SQLAlchemy ends with conn.close(), which then gives the
    # connection back to this pool instead of closing it (psycopg_pool's recipe).
    with Pool(app_dsn, min_size=1, max_size=2, close_returns=True) as pool:
        yield pool


@pytest.fixture
def engine(pool: Pool) -> Iterator[Engine]:
    # NullPool: SQLAlchemy keeps no pool of its own; every checkout is a borrow from ours.
    engine = create_engine("postgresql+psycopg://", creator=pool.getconn, poolclass=NullPool)
    yield engine
    engine.dispose()


def test_engine_and_direct_use_share_one_pool(
    pool: Pool, engine: Engine, admin_dsn: str, app_name: str
) -> None:
    with pool.connection() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS sa_notes (id int PRIMARY KEY, title text)")
        conn.execute("TRUNCATE sa_notes")
    for i in range(20):
        with engine.begin() as sa:
            sa.execute(text("INSERT INTO sa_notes VALUES (:id, :title)"), {"id": i, "title": "x"})
        assert pool.stats()["in_use"] == 0  # back in the pool when SQLAlchemy let go
    with pool.connection() as conn:
        assert conn.execute("SELECT count(*) FROM sa_notes").fetchone() == (20,)
    with Session(engine) as session:
        assert session.execute(text("SELECT count(*) FROM sa_notes")).scalar_one() == 20
        assert pool.stats()["in_use"] == 1  # the session's connection is one of ours
    stats = pool.stats()
    assert stats["in_use"] == 0
    assert stats["borrows"] == 23
    assert stats["connections_created"] <= 2  # SQLAlchemy opened none of its own
    assert backend_count(admin_dsn, app_name) <= 2


def test_sqlalchemy_borrows_count_against_the_same_bound(pool: Pool, engine: Engine) -> None:
    with engine.connect() as a, engine.connect() as b:
        assert a.execute(text("SELECT 1")).scalar_one() == b.execute(text("SELECT 1")).scalar()
        assert pool.stats()["in_use"] == 2
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.2)
    with pool.connection(timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_session_state_does_not_leak_from_sqlalchemy_to_direct_use(app_dsn: str) -> None:
    with Pool(app_dsn, min_size=1, max_size=1, close_returns=True) as pool:
        engine = create_engine("postgresql+psycopg://", creator=pool.getconn, poolclass=NullPool)
        with engine.connect() as sa:
            pid = sa.execute(text("SELECT pg_backend_pid()")).scalar_one()
            sa.execute(text("SET statement_timeout = '1234ms'"))
            sa.commit()
        engine.dispose()
        with pool.connection() as conn:
            assert conn.info.backend_pid == pid  # the same connection, reset on return
            assert conn.execute("SHOW statement_timeout").fetchone() != ("1234ms",)


def test_a_checkout_that_times_out_carries_the_pool_timeout(app_dsn: str) -> None:
    from sqlalchemy.exc import OperationalError

    with Pool(app_dsn, min_size=1, max_size=1, timeout=0.2, close_returns=True) as pool:
        engine = create_engine("postgresql+psycopg://", creator=pool.getconn, poolclass=NullPool)
        with engine.connect():
            with pytest.raises(OperationalError) as info:
                engine.connect()
            assert isinstance(info.value.orig, PoolTimeout)
        engine.dispose()
        assert pool.stats()["timeouts"] == 1
