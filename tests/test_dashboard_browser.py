"""The dashboard: its JSON snapshot, and the page in a real headless Chromium against a live app."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from poolkit import AsyncPool, Pool, PoolTimeout
from poolkit._dashboard import DashboardHistory, dashboard_html, dashboard_snapshot
from tests._helpers import terminate_backends, wait_until

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
DOCS_SCREENSHOT = ROOT / "docs" / "dashboard.png"
MAX_SIZE = 4


def _password(dsn: str) -> str:
    password = conninfo_to_dict(dsn).get("password")
    assert password, "the test server must use a password, or the masking tests prove nothing"
    return str(password)


# -- snapshot (no browser) --------------------------------------------------------------


def test_snapshot_contents_and_masking(app_dsn: str, dsn: str) -> None:
    # min = max and wait(): no connection is added in the background between the two reads.
    with Pool(app_dsn, min_size=2, max_size=2, name="snap", leak_threshold=60.0) as pool:
        pool.wait()
        history = DashboardHistory({"main": pool}, interval=0.01, window=1.0)
        for i in range(5):
            with pool.connection(tag="/a" if i % 2 else "/b") as conn:
                conn.execute("SELECT 1")
            history.sample()
        held = pool.getconn(tag="/held")
        try:
            _check_snapshot(pool, history, dsn)
        finally:
            pool.putconn(held)


def _check_snapshot(pool: Pool[Any], history: DashboardHistory, dsn: str) -> None:
    snap = dashboard_snapshot({"main": pool}, history)
    encoded = json.dumps(snap, allow_nan=False)  # strict JSON: no Infinity
    assert _password(dsn) not in encoded
    assert _password(dsn) not in dashboard_html()
    (item,) = snap["pools"]
    assert item["key"] == "main" and item["name"] == "snap"
    assert "***" in item["conninfo"]
    st = pool.stats()
    for key in ("size", "in_use", "idle", "waiting", "borrows", "timeouts"):
        assert item["stats"][key] == st[key], key
    assert item["stats"]["in_use"] == 1
    assert item["histograms"]["hold_time"]["count"] == 5
    assert item["histograms"]["wait_time"]["count"] == st["wait_time"]["count"] == 6
    buckets = item["histograms"]["wait_time"]["buckets"]
    assert buckets[-1][0] is None and buckets[-1][1] == 6
    assert [t["tag"] for t in item["top_tags"]] == sorted(
        ("/a", "/b"), key=lambda t: -pool.hold_time_by_tag()[t].sum
    )
    (borrow,) = item["borrowed"]
    assert borrow["tag"] == "/held" and "test_dashboard_browser.py" in borrow["site"]
    assert item["history"]["in_use"][-1] == 0 and len(item["history"]["t"]) == 5
    assert all(t <= 0 for t in item["history"]["t"])


def test_snapshot_masks_secrets_in_event_details(app_dsn: str, dsn: str) -> None:
    secret = _password(dsn)
    with Pool(app_dsn, min_size=1, max_size=1, name="ev") as pool:
        # an event detail quoting a connection string, as a future message might
        pool._pk_event("connection-lost", f"could not reach {dsn}")
        pool._pk_event("timeout", f"host=x password={secret} dbname=y")
        encoded = json.dumps(dashboard_snapshot({"ev": pool}))
        assert secret not in encoded
        assert encoded.count("***") >= 3  # conninfo and both details


def test_history_window_and_pools_going_away(app_dsn: str) -> None:
    with Pool(app_dsn, min_size=1, max_size=1) as pool:
        pools: dict[str, Any] = {"a": pool}
        history = DashboardHistory(pools, interval=1.0, window=3.0)
        for t in range(10):
            history.sample(now=1000.0 + t)
        assert history.series("a", now=1009.0)["size"] == [1, 1, 1, 1]
        series = history.series("a", now=1009.0)
        assert series["t"] == [-3.0, -2.0, -1.0, 0.0]
        # a callable source (poolkit_django.pools, a lambda over lifespan state)
        other = DashboardHistory(lambda: pools, interval=1.0, window=3.0)
        other.sample(now=5.0)
        assert other.series("a", now=5.0)["t"] == [0.0]
        # without a source of its own, the sampling thread leaves snapshot samples alone
        bare = DashboardHistory(interval=1.0, window=3.0)
        bare.sample(pools, now=7.0)
        bare.sample(now=8.0)
        assert bare.series("a", now=8.0)["t"] == [-1.0]
        pools.clear()
        history.sample(now=1010.0)
        assert history.series("a", now=1010.0)["t"] == []
    with pytest.raises(ValueError, match="interval"):
        DashboardHistory({}, interval=0)


def test_html_is_self_contained() -> None:
    html = dashboard_html()
    for forbidden in ("http://", "https://", "//cdn", "<link ", "src="):
        assert forbidden not in html, forbidden
    assert "<canvas" in html and "fetch(" in html
    custom = dashboard_html(data_url='/ops/pool"data')
    assert 'content="/ops/pool&quot;data"' in custom


# -- a live app ------------------------------------------------------------------------


class LiveApp:
    """A Starlette app on uvicorn in a thread: an AsyncPool borrowed per request, the
    dashboard mounted at /_poolkit/, holds released on demand."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.pool: AsyncPool[Any] | None = None
        self.history: DashboardHistory | None = None
        self.release: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        pool: AsyncPool[Any] = AsyncPool(
            self.dsn, min_size=2, max_size=MAX_SIZE, timeout=20.0, leak_threshold=1.0,
            name="web", open=False,
        )  # fmt: skip
        pool.housekeeping_interval = 0.2
        await pool.open(wait=True)
        self.pool, self.loop, self.release = pool, asyncio.get_running_loop(), asyncio.Event()
        self.history = DashboardHistory({"web": pool}, interval=0.25, window=60.0)
        self.history.start()
        try:
            yield
        finally:
            self.history.stop()
            await pool.close(timeout=2.0)

    async def query(self, request: Request) -> Response:
        assert self.pool is not None
        path, seconds = request.url.path, float(request.query_params.get("s", "0.002"))
        try:
            async with self.pool.connection(tag=path) as conn:
                await conn.execute("SELECT pg_sleep(%s)", (seconds,))
        except PoolTimeout:
            return PlainTextResponse("busy", status_code=503, headers={"Retry-After": "1"})
        except psycopg.OperationalError:
            return PlainTextResponse("database unavailable", status_code=503)
        return PlainTextResponse("ok")

    async def hold(self, request: Request) -> Response:
        assert self.pool is not None and self.release is not None
        async with self.pool.connection(tag="/hold"):
            await self.release.wait()
        return PlainTextResponse("released")

    async def impatient(self, request: Request) -> Response:
        assert self.pool is not None
        try:
            async with self.pool.connection(timeout=0.1, tag="/impatient"):
                pass
        except PoolTimeout:
            return PlainTextResponse("busy", status_code=503, headers={"Retry-After": "1"})
        return PlainTextResponse("ok")

    async def page(self, request: Request) -> Response:
        return HTMLResponse(dashboard_html())

    async def data(self, request: Request) -> Response:
        assert self.pool is not None
        return JSONResponse(dashboard_snapshot({"web": self.pool}, self.history))

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/orders", self.query),
                Route("/report", self.query),
                Route("/hold", self.hold),
                Route("/impatient", self.impatient),
                Route("/_poolkit/", self.page),
                Route("/_poolkit/data", self.data),
            ],
            lifespan=self.lifespan,
        )

    def do_release(self) -> None:
        assert self.loop is not None and self.release is not None
        self.loop.call_soon_threadsafe(self.release.set)


@pytest.fixture
def live_app(app_dsn: str) -> Iterator[LiveApp]:
    import uvicorn

    live = LiveApp(app_dsn)
    config = uvicorn.Config(
        live.app(), host="127.0.0.1", port=live.port, log_level="warning", lifespan="on",
        ws="none", access_log=False,
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), timeout=30, what="uvicorn")
        assert server.started, "uvicorn did not start (see the log above)"
        yield live
    finally:
        if live.loop is not None and live.release is not None:
            live.do_release()
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive(), "uvicorn did not stop"


def _chromium() -> tuple[str, str]:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = [p for p in (chromium, driver) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(
            f"headless Chromium not available ({', '.join(missing)} missing): install Debian's "
            "chromium and chromium-driver (bash scripts/setup.sh --system)"
        )
    return chromium, driver


@pytest.fixture
def browser() -> Iterator[Any]:
    chromium, driver_path = _chromium()
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (dev extra)")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium fetch a browser or driver
    profile = tempfile.mkdtemp(prefix="poolkit-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
        f"--user-data-dir={profile}", "--window-size=1360,1640",
    ):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _load(url: str, paths: list[str], until: float, errors: list[str]) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        i = 0
        while time.monotonic() < until:
            path = paths[i % len(paths)]
            i += 1
            try:
                r = client.get(path)
                if r.status_code not in (200, 503):
                    errors.append(f"{path}: HTTP {r.status_code}")
            except httpx.HTTPError as exc:
                errors.append(f"{path}: {exc!r}")


def _shown(driver: Any, pool_key: str) -> dict[str, Any]:
    """What the page shows for one pool, read from the DOM."""
    return driver.execute_script(  # type: ignore[no-any-return]
        """
        const sec = document.querySelector(`section.pool[data-pool="${arguments[0]}"]`);
        if (!sec) return null;
        const num = (t) => Number(t.replace(/[^0-9.-]/g, ""));
        const stats = {};
        sec.querySelectorAll("[data-stat]").forEach(
            (el) => stats[el.dataset.stat] = num(el.textContent));
        const rows = (name) => [...sec.querySelectorAll(`[data-table="${name}"] tbody tr`)]
            .filter((tr) => !tr.querySelector(".none"));
        const canvasInk = (name) => {
            const c = sec.querySelector(`[data-chart="${name}"]`);
            const px = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            let ink = 0;
            for (let i = 3; i < px.length; i += 4) if (px[i] > 0) ink++;
            return ink;
        };
        return {
            generatedAt: Number(document.body.dataset.generatedAt || 0),
            stats,
            borrowed: rows("borrowed").map((tr) => ({
                site: tr.cells[1].textContent, suspect: tr.classList.contains("suspect"),
                tag: tr.cells[3].textContent})),
            tags: Object.fromEntries(
                rows("tags").map((tr) => [tr.dataset.tag, num(tr.cells[1].textContent)])),
            events: rows("events").map((tr) => tr.cells[1].textContent),
            ink: {history: canvasInk("history"), wait: canvasInk("wait_time"),
                  hold: canvasInk("hold_time")},
            status: document.getElementById("status").textContent,
        };
        """,
        pool_key,
    )


@pytest.mark.slow
@pytest.mark.timing
def test_dashboard_in_chromium_matches_stats(
    live_app: LiveApp, browser: Any, admin_dsn: str, app_name: str, dsn: str
) -> None:
    browser.get(live_app.url + "/_poolkit/")
    wait_until(lambda: _shown(browser, "web"), timeout=15, what="the pool section to render")
    pool = live_app.pool
    assert pool is not None

    # 1. load: more concurrent clients than connections, two routes with different holds,
    # and every backend killed halfway through.
    errors: list[str] = []
    until = time.monotonic() + 4.0
    paths = [["/orders"], ["/orders"], ["/report?s=0.02"], ["/orders", "/report?s=0.01"]] * 2
    workers = [threading.Thread(target=_load, args=(live_app.url, p, until, errors)) for p in paths]
    for w in workers:
        w.start()
    wait_until(lambda: pool.stats()["borrows"] > 200, timeout=20, what="load to get going")
    assert terminate_backends(admin_dsn, application_name=app_name)
    for w in workers:
        w.join(30)
    assert not errors, errors[:5]
    wait_until(lambda: pool.stats()["connections_lost"] >= 1, what="the loss to be seen")

    # 2. freeze: every connection held, two more requests queued, one request timed out.
    leaks_before = pool.stats()["leaks_detected"]
    holders = [
        threading.Thread(target=httpx.get, args=(live_app.url + "/hold",), kwargs={"timeout": 60})
        for _ in range(MAX_SIZE + 2)
    ]
    for h in holders:
        h.start()
    wait_until(
        lambda: pool.stats()["in_use"] == MAX_SIZE and pool.stats()["waiting"] == 2,
        timeout=20,
        what="a saturated pool with two waiters",
    )
    assert httpx.get(live_app.url + "/impatient", timeout=10).status_code == 503
    wait_until(
        lambda: pool.stats()["leaks_detected"] == leaks_before + MAX_SIZE,
        timeout=10,
        what="the held borrows to pass leak_threshold",
    )
    frozen_at = time.time()
    shown = wait_until(
        lambda: (s := _shown(browser, "web")) and s["generatedAt"] > frozen_at + 0.3 and s,
        timeout=15,
        what="a refresh after the freeze",
    )
    st = pool.stats()
    for key in (
        "size", "in_use", "idle", "waiting", "borrows", "timeouts", "connections_lost",
        "leaks_detected",
    ):  # fmt: skip
        assert shown["stats"][key] == st[key], (key, shown["stats"], st)
    assert shown["stats"]["in_use"] == MAX_SIZE and shown["stats"]["waiting"] == 2
    borrowed = pool.borrowed()
    assert len(shown["borrowed"]) == len(borrowed) == MAX_SIZE
    assert all(b["suspect"] for b in shown["borrowed"])
    assert all(b["tag"] == "/hold" for b in shown["borrowed"])
    assert all("test_dashboard_browser.py" in b["site"] for b in shown["borrowed"])
    tags = pool.hold_time_by_tag()
    for route in ("/orders", "/report"):
        assert shown["tags"][route] == tags[route].count > 0
    assert {"connection-lost", "timeout", "leak-suspect"} <= set(shown["events"])
    assert all(v > 500 for v in shown["ink"].values()), shown["ink"]  # charts were drawn
    assert shown["status"].startswith("updated")

    # 3. no password anywhere the browser can see
    secret = _password(dsn)
    assert secret not in browser.page_source
    assert secret not in httpx.get(live_app.url + "/_poolkit/data", timeout=10).text

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000
    if os.environ.get("POOLKIT_UPDATE_DOCS_SCREENSHOT") or not DOCS_SCREENSHOT.exists():
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)

    live_app.do_release()
    for h in holders:
        h.join(30)
    wait_until(lambda: pool.stats()["in_use"] == 0, what="every hold to end")
