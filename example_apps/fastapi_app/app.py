"""The notes API: one pooled connection, and one transaction, per request."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import psycopg
from fastapi import FastAPI, HTTPException, Query, Response
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, StreamingResponse
from psycopg.rows import dict_row
from pydantic import AfterValidator, BaseModel, Field

from example_apps._embedded_pg import ExampleServer
from poolkit import PoolConfig
from poolkit_fastapi import Conn, PoolLifespan, StreamConn, SyncConn, get_pools, pool_router

__all__ = ["DASHBOARD_PREFIX", "DATA_DIR", "app", "create_app", "dashboard_enabled", "pool_config"]

# Where the embedded server lives when DATABASE_URL is not set (git-ignored).
DATA_DIR = Path(".poolkit/pgdata")

SCHEMA = """
CREATE TABLE IF NOT EXISTS notes (
    id bigserial PRIMARY KEY,
    title text NOT NULL,
    body text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS note_tags (
    note_id bigint NOT NULL REFERENCES notes (id) ON DELETE CASCADE,
    tag text NOT NULL CHECK (tag ~ '^[a-z0-9-]{1,32}$'),
    PRIMARY KEY (note_id, tag)
);
CREATE INDEX IF NOT EXISTS note_tags_tag ON note_tags (tag);
CREATE TABLE IF NOT EXISTS note_events (
    id bigserial PRIMARY KEY,
    note_id bigint NOT NULL,
    kind text NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
"""

NOTE_SELECT = """
SELECT n.id, n.title, n.body, n.created_at, n.updated_at,
       coalesce(array_agg(t.tag ORDER BY t.tag) FILTER (WHERE t.tag IS NOT NULL), '{}') AS tags
FROM notes n LEFT JOIN note_tags t ON t.note_id = n.id
"""

# Settings the example picks when the environment does not (POOLKIT_TIMEOUT=... wins).
DEFAULTS: dict[str, Any] = {
    "application_name": "poolkit-fastapi-example",
    "min_size": 2,
    "max_size": 10,
    "timeout": 5.0,
}
# Variables under POOLKIT_ that configure the embedded server, not the pool.
_NOT_POOL_SETTINGS = ("POOLKIT_PG_BINDIR",)
# The live pool dashboard: on in this demo unless POOLKIT_DASHBOARD=0 (pool_router's
# default, for real apps, is off).
DASHBOARD_PREFIX = "/_poolkit"


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL: psycopg would raise DataError, a 500.
    if "\x00" in value:
        raise ValueError("must not contain NUL (\\u0000) characters")
    return value


# Input is checked here, before any SQL: a request the database would refuse is a 422.
Text = Annotated[str, AfterValidator(_no_nul)]
Title = Annotated[Text, Field(min_length=1, max_length=200)]
TAG_PATTERN = r"^[a-z0-9-]{1,32}$"  # the same rule as the note_tags CHECK constraint
Tag = Annotated[str, Field(pattern=TAG_PATTERN, description="1-32 of a-z, 0-9, -")]
Tags = Annotated[list[Tag], Field(max_length=100)]
NoteId = Annotated[int, PathParam(ge=-(2**63), le=2**63 - 1)]  # bigint: others are 422


class NoteIn(BaseModel):
    title: Title
    body: Text = ""
    tags: Tags = []


class NotePatch(BaseModel):
    title: Title | None = None
    body: Text | None = None
    tags: Tags | None = None


class Note(BaseModel):
    id: int
    title: str
    body: str
    tags: list[str]
    created_at: datetime
    updated_at: datetime


def pool_config(url: str) -> PoolConfig:
    """The pool settings: `url`, POOLKIT_* variables, then the example's defaults."""
    # from_env() rejects unknown POOLKIT_* variables, and POOLKIT_PG_BINDIR is the
    # embedded server's, so it is filtered out here.
    env = {k: v for k, v in os.environ.items() if k not in _NOT_POOL_SETTINGS}
    defaults = {k: v for k, v in DEFAULTS.items() if f"POOLKIT_{k.upper()}" not in env}
    return PoolConfig.from_env(env, conninfo=url, **defaults)


def dashboard_enabled() -> bool:
    """Whether the example serves the dashboard: yes unless POOLKIT_DASHBOARD is 0/false/no/off."""
    value = os.environ.get("POOLKIT_DASHBOARD", "1").strip().lower()
    return value not in {"0", "false", "no", "off"}


@asynccontextmanager
async def _pools(app: FastAPI, url: str) -> AsyncIterator[dict[str, Any]]:
    config = pool_config(url)
    # `def` routes need a sync pool: a small one next to the async pool.
    sync = config.replace(name=None, min_size=1, max_size=2)
    async with PoolLifespan(config, sync_pools=sync)(app) as state:
        async with get_pools(state).get().connection(tag="startup") as conn:
            # Several workers may start at once: one creates the schema at a time.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('poolkit-example'))")
            await conn.execute(SCHEMA)
        yield state


def create_app(database_url: str | None = None) -> FastAPI:
    """The notes app on `database_url`, else $DATABASE_URL, else an embedded server."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        url = database_url or os.environ.get("DATABASE_URL")
        embedded: ExampleServer | None = None
        if not url:  # blocking (it may run initdb): off the event loop
            # Kept running on exit: other workers of this server may still use it.
            embedded = await asyncio.to_thread(ExampleServer, DATA_DIR, keep=True)
            url = embedded.dsn
        try:
            async with _pools(app, url) as state:
                yield state
        finally:
            if embedded is not None:
                print(embedded.close(), flush=True)  # where it runs, how to stop it

    app = FastAPI(title="poolkit notes", lifespan=lifespan)

    # A real app guards the dashboard with its own auth: dashboard_dependencies=[Depends(...)].
    router = pool_router(dashboard=dashboard_enabled(), dashboard_prefix=DASHBOARD_PREFIX)
    app.include_router(router, tags=["operations"])
    pages = [("/docs", "API docs"), ("/notes", "notes (JSON)"), ("/ready", "readiness")]
    if dashboard_enabled():
        pages.insert(1, (f"{DASHBOARD_PREFIX}/", "pool dashboard"))
    pages.append(("/metrics", "Prometheus metrics"))
    links = "".join(f'<li><a href="{href}">{text}</a> <code>{href}</code>' for href, text in pages)
    index_page = f"<!doctype html><title>poolkit notes</title><h1>poolkit notes</h1><ul>{links}"

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def index() -> str:
        # The address printed at startup lands on the pages to open, not on a 404.
        return index_page

    @app.post("/notes", status_code=201)
    async def create_note(note: NoteIn, conn: Conn) -> Note:
        """Note, tags and an audit event: three statements, one transaction."""
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            "INSERT INTO notes (title, body) VALUES (%s, %s) RETURNING id", (note.title, note.body)
        )
        row = await cur.fetchone()
        assert row is not None
        await _set_tags(conn, row["id"], note.tags)
        await _event(conn, row["id"], "created")
        return await _get(conn, row["id"])

    @app.get("/notes")
    async def list_notes(
        conn: Conn,
        tag: Annotated[str | None, Query(pattern=TAG_PATTERN)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    ) -> list[Note]:
        cur = conn.cursor(row_factory=dict_row)
        where = "WHERE n.id IN (SELECT note_id FROM note_tags WHERE tag = %(tag)s)" if tag else ""
        await cur.execute(
            f"{NOTE_SELECT} {where} GROUP BY n.id ORDER BY n.id LIMIT %(limit)s OFFSET %(offset)s",
            {"tag": tag, "limit": limit, "offset": offset},
        )
        return [Note(**row) for row in await cur.fetchall()]

    @app.get("/notes/export")
    async def export_notes(conn: StreamConn) -> StreamingResponse:
        """Every note as NDJSON, streamed from a server-side cursor (the connection is held
        until the last line is sent: StreamConn)."""

        async def lines() -> AsyncIterator[str]:
            async with conn.cursor("notes_export", row_factory=dict_row) as cur:
                await cur.execute(f"{NOTE_SELECT} GROUP BY n.id ORDER BY n.id")
                async for row in cur:
                    yield Note(**row).model_dump_json() + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.get("/notes/{note_id}")
    async def get_note(note_id: NoteId, conn: Conn) -> Note:
        return await _get(conn, note_id)

    @app.patch("/notes/{note_id}")
    async def update_note(note_id: NoteId, patch: NotePatch, conn: Conn) -> Note:
        cur = await conn.execute(
            "UPDATE notes SET title = coalesce(%s, title), body = coalesce(%s, body),"
            " updated_at = now() WHERE id = %s",
            (patch.title, patch.body, note_id),
        )
        if cur.rowcount == 0:
            raise HTTPException(404, f"no note {note_id}")
        if patch.tags is not None:
            await conn.execute("DELETE FROM note_tags WHERE note_id = %s", (note_id,))
            await _set_tags(conn, note_id, patch.tags)
        await _event(conn, note_id, "updated")
        return await _get(conn, note_id)

    @app.delete("/notes/{note_id}", status_code=204)
    async def delete_note(note_id: NoteId, conn: Conn) -> Response:
        cur = await conn.execute("DELETE FROM notes WHERE id = %s", (note_id,))
        if cur.rowcount == 0:
            raise HTTPException(404, f"no note {note_id}")
        await _event(conn, note_id, "deleted")
        return Response(status_code=204)

    @app.get("/stats")
    def stats(conn: SyncConn) -> dict[str, int]:
        """A `def` route: runs in a worker thread with a connection from the sync pool."""
        row = conn.execute(
            "SELECT (SELECT count(*) FROM notes), (SELECT count(DISTINCT tag) FROM note_tags),"
            " (SELECT count(*) FROM note_events)"
        ).fetchone()
        assert row is not None
        return dict(zip(("notes", "tags", "events"), row, strict=True))

    return app


async def _get(conn: psycopg.AsyncConnection[Any], note_id: int) -> Note:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"{NOTE_SELECT} WHERE n.id = %s GROUP BY n.id", (note_id,))
    row = await cur.fetchone()
    if row is None:
        raise HTTPException(404, f"no note {note_id}")
    return Note(**row)


async def _set_tags(conn: psycopg.AsyncConnection[Any], note_id: int, tags: list[str]) -> None:
    # One statement for every tag, not executemany(): executemany runs in a pipeline, where
    # a failed row followed by a failing parameter leaves the pipeline in error.
    await conn.execute(
        "INSERT INTO note_tags (note_id, tag) SELECT %s, unnest(%s::text[]) ON CONFLICT DO NOTHING",
        (note_id, tags),
    )


async def _event(conn: psycopg.AsyncConnection[Any], note_id: int, kind: str) -> None:
    await conn.execute("INSERT INTO note_events (note_id, kind) VALUES (%s, %s)", (note_id, kind))


# For `uvicorn example_apps.fastapi_app.app:app`: configured at startup, no I/O at import.
app = create_app()
