"""The dashboard: its JSON snapshot, and the page in a real headless Chromium against a live app."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from poolkit import DashboardHistory, Pool, dashboard_html, dashboard_snapshot
from tests._helpers import wait_until
from tests._proxy import TcpProxy
from tests.test_example_fastapi import ExampleProcess, example_env, wait_ready

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
        pool._event("connection-lost", f"could not reach {dsn}")
        pool._event("timeout", f"host=x password={secret} dbname=y")
        encoded = json.dumps(dashboard_snapshot({"ev": pool}))
        assert secret not in encoded
        assert encoded.count("***") >= 3  # conninfo and both details


def test_history_window_and_pools_going_away(app_dsn: str) -> None:
    with Pool(app_dsn, min_size=1, max_size=1) as pool:
        pool.wait()  # `with` opens without waiting, as psycopg_pool's does
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


def _outages(proxy: TcpProxy, pool: Pool[Any], history: DashboardHistory, n: int) -> None:
    """`n` real outages (the network path cut, then restored), with failed borrows (timeout
    events) during each, sampled by `history` as the dashboard's sampler does."""
    for _ in range(n):
        proxy.stop()
        for _ in range(3):
            with contextlib.suppress(psycopg.Error), pool.connection(timeout=0.3) as conn:
                conn.execute("SELECT 1")
            history.sample()
        proxy.start()

        def answers() -> bool:
            try:
                with pool.connection(timeout=1.0) as conn:
                    conn.execute("SELECT 1")
                return True
            except psycopg.Error:
                return False

        wait_until(answers, timeout=30, interval=0.05, what="the pool to recover")
        history.sample()


def test_every_outage_and_recovery_the_pool_reports_is_listed(
    proxy: TcpProxy, proxy_dsn: str
) -> None:
    with Pool(proxy_dsn, min_size=1, max_size=2, name="outages", timeout=0.3) as pool:
        pool.wait()
        history = DashboardHistory({"o": pool}, interval=0.05, window=300.0)
        _outages(proxy, pool, history, 4)
        emitted = [(t, kind) for t, kind, _ in pool.events()]
        # Bursts of other events afterwards push the outages out of the pool's own list
        # (it keeps its last 200): the history, sampled meanwhile, still has them.
        for i in range(300):
            pool._event("leak-suspect", f"site {i}")
            if i % 150 == 149:
                history.sample()
        assert not any(k == "connection-lost" for _, k, _ in pool.events())
        (item,) = dashboard_snapshot({"o": pool}, history)["pools"]
    lifecycle = [k for _, k in emitted if k in ("connection-lost", "recovered")]
    listed = [e["kind"] for e in item["events"] if e["kind"] in ("connection-lost", "recovered")]
    assert listed == lifecycle[::-1], (listed, lifecycle)  # all of them, newest first
    assert lifecycle.count("connection-lost") >= 4, lifecycle
    # the burst of one kind is one row with its count
    (burst,) = [e for e in item["events"] if e["kind"] == "leak-suspect"]
    assert burst["count"] == 300 and burst["detail"] == "site 299"
    assert [e["ago"] for e in item["events"]] == sorted(e["ago"] for e in item["events"])


def test_the_pool_reports_one_recovery_per_outage(proxy: TcpProxy, proxy_dsn: str) -> None:
    with Pool(proxy_dsn, min_size=1, max_size=2, name="recoveries", timeout=0.3) as pool:
        pool.wait()
        history = DashboardHistory({"o": pool}, interval=0.05, window=300.0)
        _outages(proxy, pool, history, 4)
        (item,) = dashboard_snapshot({"o": pool}, history)["pools"]
    kinds = [e["kind"] for e in item["events"]]
    assert kinds.count("recovered") == 4, kinds
    assert sum(1 for k in kinds if k in ("connection-lost", "connect-failed")) == 4, kinds


def test_conninfo_from_connection_kwargs_is_a_masked_url(dsn: str) -> None:
    """Django passes host/user/password/dbname as kwargs: the page names the server anyway."""
    params = conninfo_to_dict(dsn)
    kwargs = {k: params[k] for k in ("host", "port", "user", "password", "dbname")}
    with Pool(kwargs=kwargs, min_size=1, max_size=1, name="kw") as pool:
        (item,) = dashboard_snapshot({"kw": pool})["pools"]
    expected = (
        f"postgresql://{params['user']}:***@{params['host']}:{params['port']}/{params['dbname']}"
    )
    assert item["conninfo"] == expected
    assert _password(dsn) not in json.dumps(item)


def test_history_sampling_thread_fills_the_history(app_dsn: str) -> None:
    with Pool(app_dsn, min_size=1, max_size=1) as pool:
        history = DashboardHistory({"a": pool}, interval=0.02, window=10.0)
        history.start()
        try:
            wait_until(lambda: len(history.series("a")["t"]) >= 5, timeout=10, what="samples")
        finally:
            history.stop()
        (item,) = dashboard_snapshot({"a": pool}, history)["pools"]
        assert len(item["history"]["t"]) >= 5


def test_html_is_self_contained() -> None:
    html = dashboard_html()
    for forbidden in ("https://", "//cdn", "src=", "@import", "url("):
        assert forbidden not in html, forbidden
    # The only links: the favicon, inline; the only http:// is its SVG namespace.
    assert re.findall(r"<link [^>]*>", html) == [
        re.search(r'<link rel="icon" href="data:image/svg\+xml,[^"]+">', html).group(0)  # type: ignore[union-attr]
    ]
    assert set(re.findall(r"http://[^%\s\"']*", html)) == {"http://www.w3.org/2000/svg"}
    assert "<canvas" in html and "fetch(" in html
    custom = dashboard_html(data_url='/ops/pool"data')
    assert 'content="/ops/pool&quot;data"' in custom


# -- the example app, live ----------------------------------------------------------------


@pytest.fixture
def example_app(proxy_dsn: str, app_name: str) -> Iterator[tuple[ExampleProcess, str]]:
    """The FastAPI example (`python -m example_apps.fastapi_app`), its dashboard on by
    default, reaching the server through the `proxy` (the test cuts the path)."""
    env = example_env(
        DATABASE_URL=proxy_dsn,
        POOLKIT_APPLICATION_NAME=app_name,
        POOLKIT_MIN_SIZE="2",
        POOLKIT_MAX_SIZE=str(MAX_SIZE),
        POOLKIT_TIMEOUT="60",  # nobody times out while the test holds the pool
        POOLKIT_LEAK_THRESHOLD="1",
    )
    proc = ExampleProcess(ROOT, env, app_name)
    try:
        url = proc.url()
        with httpx.Client(base_url=url, timeout=30) as client:
            wait_ready(client, proc)
        assert f"pool dashboard: {url}/_poolkit/" in proc.output
        yield proc, url
    finally:
        proc.stop()


def _chromium() -> tuple[str, str]:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = [p for p in (chromium, driver) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(
            f"headless Chromium not available ({', '.join(missing)} missing): install it with "
            "`sudo apt-get install chromium chromium-driver` (or, as root, "
            "`bash scripts/setup.sh --system`)"
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


@contextlib.contextmanager
def _serving(routes: dict[str, tuple[str, bytes]]) -> Iterator[str]:
    """A local HTTP server answering GET `path` with (content type, body); yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            content_type, body = routes.get(self.path, ("text/plain", b"not found"))
            self.send_response(200 if self.path in routes else 404)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.mark.slow
def test_page_breaks_the_line_on_gaps_and_lists_events_with_units(
    browser: Any, app_dsn: str
) -> None:
    """A history with holes is drawn in segments, never a diagonal across a hole;
    every event row is shown (a run of one kind as one row with its count); figures carry
    their units."""
    with Pool(app_dsn, min_size=1, max_size=2, name="static") as pool:
        pool.wait()
        history = DashboardHistory({"s": pool}, interval=1.0, window=300.0)
        start = time.monotonic() - 100
        for t in [*range(10), *range(50, 60)]:
            history.sample(now=start + t)
        for kind in ("connection-lost", "timeout", "timeout", "timeout", "recovered"):
            pool._event(kind, f"{kind} detail")
        snap = dashboard_snapshot({"s": pool}, history)
    (item,) = snap["pools"]
    # two runs of ten samples 40 s apart, and the one the snapshot took now, 41 s later
    assert len(item["history"]["t"]) == 21
    routes = {
        "/_poolkit/": ("text/html; charset=utf-8", dashboard_html().encode()),
        "/_poolkit/data": ("application/json", json.dumps(snap).encode()),
    }
    with _serving(routes) as url:
        browser.get(url + "/_poolkit/")
        wait_until(lambda: _shown(browser, "s"), timeout=15, what="the pool section to render")
        chart, rows, tiles, favicon = browser.execute_script(
            """
            const sec = document.querySelector('section.pool[data-pool="s"]');
            const c = sec.querySelector('[data-chart="history"]');
            const rows = [...sec.querySelectorAll('[data-table="events"] tbody tr')]
                .map((tr) => [...tr.cells].map((td) => td.textContent));
            const tiles = [...sec.querySelectorAll(".tile .value")].map((v) => v.textContent);
            const icon = document.querySelector('link[rel="icon"]').href;
            return [{points: c.dataset.points, segments: c.dataset.segments}, rows, tiles, icon];
            """
        )
    assert chart == {"points": "21", "segments": "3"}, chart
    assert [(r[1], r[2]) for r in rows] == [
        ("recovered", "1"),
        ("timeout", "\u00d73"),  # times 3
        ("connection-lost", "1"),
    ], rows
    assert all(r[3] == f"{r[1]} detail" for r in rows)
    # every figure has a unit: counts name what they count, durations carry ms/µs/s
    assert all(re.search(r"\d\s*(conn|callers|total|borrows|ms|µs|s)$", t) for t in tiles), tiles
    assert favicon.startswith("data:image/svg+xml,")


def _load(url: str, note_id: int, worker: int, until: float, errors: list[str]) -> None:
    """One client of the example app until `until`: writes, reads, lists, a `def` route."""
    with httpx.Client(base_url=url, timeout=30) as client:
        i = 0
        while time.monotonic() < until:
            i += 1
            try:
                if i % 4 == 0:
                    body = {"title": f"load {worker}-{i}", "tags": ["load"]}
                    r = client.post("/notes", json=body)
                else:
                    r = client.get(("/notes?limit=5", f"/notes/{note_id}", "/stats")[i % 4 - 1])
                if r.status_code not in (200, 201, 503):
                    errors.append(f"{r.request.url.path}: HTTP {r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as exc:
                errors.append(f"{exc!r}")


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
            chart: {points: Number(sec.querySelector('[data-chart="history"]').dataset.points),
                    segments: Number(sec.querySelector('[data-chart="history"]').dataset.segments)},
            ink: {history: canvasInk("history"), wait: canvasInk("wait_time"),
                  hold: canvasInk("hold_time")},
            status: document.getElementById("status").textContent,
        };
        """,
        pool_key,
    )


STATS_SHOWN = (
    "size", "in_use", "idle", "waiting", "borrows", "timeouts", "connections_lost",
    "leaks_detected",
)  # fmt: skip


def _stats(item: dict[str, Any]) -> dict[str, Any]:
    return {k: item["stats"][k] for k in STATS_SHOWN}


def _refreshed(driver: Any, keys: list[str], since: float) -> dict[str, Any] | None:
    """What the page shows for each pool once it has refreshed after `since`, else None."""
    shown = {k: _shown(driver, k) for k in keys}
    if all(v and v["generatedAt"] > since for v in shown.values()):
        return shown
    return None


def _shown_and_served(driver: Any, client: httpx.Client) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the page shows for every pool, with the snapshot it must equal.

    The page refreshes itself every second: a refresh taken between two snapshots with
    equal stats must show exactly those stats.
    """
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        before = client.get("/_poolkit/data").json()
        keys = [item["key"] for item in before["pools"]]
        shown = wait_until(
            functools.partial(_refreshed, driver, keys, before["generated_at"]),
            timeout=15,
            what="the page to refresh",
        )
        served = {i["key"]: i for i in client.get("/_poolkit/data").json()["pools"]}
        if {k: _stats(i) for k, i in served.items()} == {
            i["key"]: _stats(i) for i in before["pools"]
        }:
            return shown, served
    raise AssertionError("the pool stats did not stay still for one page refresh in 30 s")


@pytest.mark.slow
@pytest.mark.timing
def test_dashboard_in_chromium_matches_stats(
    example_app: tuple[ExampleProcess, str],
    browser: Any,
    admin_dsn: str,
    dsn: str,
    proxy: TcpProxy,
) -> None:
    proc, url = example_app
    with httpx.Client(base_url=url, timeout=30) as client:
        page = client.get("/_poolkit/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        note = client.post("/notes", json={"title": "dashboard", "tags": ["ops"]})
        assert note.status_code == 201, note.text
        data = client.get("/_poolkit/data").json()
        (key,) = [p["key"] for p in data["pools"] if p["config"]["max_size"] == MAX_SIZE]
        # 0. history: sampled by the app since startup, drawn by the page's first render.
        wait_until(
            lambda: len(_served(client, key)["history"]["t"]) >= 3,
            timeout=15,
            what="three history samples before the page opens",
        )
        browser.get(url + "/_poolkit/")
        wait_until(lambda: _shown(browser, key), timeout=15, what="the pool section to render")
        first = _shown(browser, key)
        assert first["chart"]["points"] >= 3 and first["chart"]["segments"] == 1, first["chart"]

        # 1. load: twice as many clients as connections, on the example's own routes
        # (async and `def`), bounded in time; the page keeps refreshing meanwhile.
        errors: list[str] = []
        until = time.monotonic() + 4.0
        workers = [
            threading.Thread(target=_load, args=(url, note.json()["id"], i, until, errors))
            for i in range(2 * MAX_SIZE)
        ]
        for w in workers:
            w.start()
        wait_until(
            lambda: (_shown(browser, key) or {}).get("stats", {}).get("borrows", 0) > 50,
            timeout=20,
            what="the page to show the load",
        )
        for w in workers:
            w.join(30)
        assert not any(w.is_alive() for w in workers), "the load did not stop"
        assert not errors, errors[:5]

        # 2. freeze: the notes table locked, so MAX_SIZE requests hold every connection
        # (leak suspects after 1 s) and two more wait; nothing moves until it is unlocked.
        with psycopg.connect(admin_dsn) as lock:
            lock.execute("LOCK TABLE notes IN ACCESS EXCLUSIVE MODE")
            holders = [
                threading.Thread(target=httpx.get, args=(url + "/notes",), kwargs={"timeout": 90})
                for _ in range(MAX_SIZE + 2)
            ]
            for h in holders:
                h.start()
            try:
                _check_frozen_page(browser, client, key, dsn)
            finally:
                lock.rollback()
                for h in holders:
                    h.join(60)
        assert not any(h.is_alive() for h in holders), "the held requests did not end"
        wait_until(
            lambda: (st := _served(client, key)["stats"])["in_use"] == 0 and st["waiting"] == 0,
            timeout=20,
            what="every held request to end",
        )

        # 3. outages: the path to the server cut twice under load, then restored; the
        # page lists every event the app reports, newest first, and keeps its history.
        until = time.monotonic() + 8.0
        workers = [
            threading.Thread(target=_load, args=(url, note.json()["id"], i, until, []))
            for i in range(MAX_SIZE)
        ]
        for w in workers:
            w.start()
        for _ in range(2):
            time.sleep(1.0)
            proxy.stop()
            time.sleep(1.0)
            proxy.start()
            wait_until(functools.partial(_ready, client), timeout=30, what="ready again")
        time.sleep(1.5)  # the page refreshes with the load running: the screenshot's moment
        _check_events_and_screenshot(browser, client, key)
        for w in workers:
            w.join(30)
        assert not any(w.is_alive() for w in workers), "the load did not stop"
    assert proc.proc.poll() is None, f"the example exited:\n{proc.output}"


def _ready(client: httpx.Client) -> bool:
    try:
        return client.get("/ready").status_code == 200
    except httpx.TransportError:  # a kept-alive connection the server closed meanwhile
        return False


def _check_events_and_screenshot(browser: Any, client: httpx.Client, key: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        data = client.get("/_poolkit/data").json()
        served = next(p for p in data["pools"] if p["key"] == key)
        shown = wait_until(
            functools.partial(_refreshed, browser, [key], data["generated_at"]),
            timeout=15,
            what="the page to refresh",
        )[key]
        again = _served(client, key)
        if [e["kind"] for e in again["events"]] == [e["kind"] for e in served["events"]]:
            break  # no event came between the two reads: the page shows this list
        assert time.monotonic() < deadline, "events kept coming for 30 s"
    kinds = [e["kind"] for e in served["events"]]
    assert shown["events"] == kinds, (shown["events"], kinds)
    assert kinds.count("connection-lost") >= 2, kinds
    assert shown["chart"]["points"] >= 10, shown["chart"]

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000
    if os.environ.get("POOLKIT_UPDATE_DOCS_SCREENSHOT") or not DOCS_SCREENSHOT.exists():
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)


def _served(client: httpx.Client, key: str) -> dict[str, Any]:
    data = client.get("/_poolkit/data").json()
    return next(p for p in data["pools"] if p["key"] == key)


def _check_frozen_page(browser: Any, client: httpx.Client, key: str, dsn: str) -> None:
    wait_until(
        lambda: (
            (st := _served(client, key)["stats"])["in_use"] == MAX_SIZE
            and st["waiting"] == 2
            and st["leaks_detected"] >= MAX_SIZE
        ),
        timeout=20,
        what="a saturated pool with two waiters and the holds seen as leak suspects",
    )
    shown, served = _shown_and_served(browser, client)
    assert set(shown) == set(served) and len(served) == 2  # the async pool and the sync one
    for name, item in served.items():
        assert shown[name]["stats"] == _stats(item), (name, shown[name]["stats"], item["stats"])
        assert shown[name]["tags"] == {t["tag"]: t["count"] for t in item["top_tags"]}, name
    main = served[key]
    assert shown[key]["stats"]["in_use"] == MAX_SIZE and shown[key]["stats"]["waiting"] == 2
    assert shown[key]["stats"]["borrows"] > 50
    assert shown[key]["tags"]["POST /notes"] > 0 and shown[key]["tags"]["GET /notes/{note_id}"] > 0
    assert len(shown[key]["borrowed"]) == len(main["borrowed"]) == MAX_SIZE
    assert all(b["suspect"] and b["tag"] == "GET /notes" for b in shown[key]["borrowed"])
    assert "leak-suspect" in shown[key]["events"]
    assert all(v > 500 for v in shown[key]["ink"].values()), shown[key]["ink"]  # charts drawn
    assert shown[key]["status"].startswith("updated")

    # no password anywhere the browser can see
    secret = _password(dsn)
    assert secret not in browser.page_source
    assert secret not in client.get("/_poolkit/data").text
