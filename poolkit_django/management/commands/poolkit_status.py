"""manage.py poolkit_status: pool settings and state, and what the server sees."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from poolkit import mask_conninfo
from poolkit_django._options import is_ours, pool_config
from poolkit_django._registry import config_mapping, get_pool
from poolkit_django.routers import topology

_SERVER_SQL = """
SELECT current_setting('max_connections')::int,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'),
       (SELECT count(*) FROM pg_stat_activity
         WHERE backend_type = 'client backend' AND datname = current_database()),
       current_database()
"""
_BY_APP_SQL = """
SELECT coalesce(nullif(application_name, ''), '(none)'), coalesce(state, '?'), count(*)
  FROM pg_stat_activity
 WHERE backend_type = 'client backend' AND datname = current_database()
 GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2
"""


class Command(BaseCommand):
    help = (
        "Show the poolkit pool of each database: settings, a live borrow from this process, "
        "and the server's connection usage. With --url, show the pools of a running server "
        "(its poolkit health view) instead."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--database", action="append", help="alias (repeatable); default all")
        parser.add_argument(
            "--url",
            help="health view of a running server, e.g. http://127.0.0.1:8000/poolkit/health",
        )
        parser.add_argument("--json", action="store_true", help="print JSON")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["url"]:
            report = self._remote(options["url"])
        else:
            report = self._local(options["database"])
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2, default=str))
            return
        for alias, info in report.items():
            self._print(alias, info)

    def _remote(self, url: str) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:  # 503 still carries the report
            body = exc.read()
        except OSError as exc:
            raise CommandError(f"cannot fetch {url}: {exc}") from None
        try:
            data = json.loads(body)
            return {alias: {"remote": url, **info} for alias, info in data["databases"].items()}
        except (ValueError, KeyError, TypeError):
            raise CommandError(f"{url} did not answer like poolkit_django's health view") from None

    def _local(self, aliases: list[str] | None) -> dict[str, Any]:
        ours = {a: db for a, db in settings.DATABASES.items() if is_ours(db)}
        if aliases:
            unknown = [a for a in aliases if a not in ours]
            if unknown:
                raise CommandError(f"not poolkit_django databases: {', '.join(unknown)}")
            ours = {a: ours[a] for a in aliases}
        report: dict[str, Any] = {}
        for alias, db in ours.items():
            config = pool_config(alias, db)
            where = mask_conninfo(
                f"postgresql://{db.get('USER') or ''}:{db.get('PASSWORD') or ''}"
                f"@{db.get('HOST') or ''}:{db.get('PORT') or ''}/{db.get('NAME') or ''}"
            )
            info: dict[str, Any] = {"database": where}
            if config is None:
                info["status"] = "pooling off (OPTIONS['pool'] is False)"
                report[alias] = info
                continue
            info["settings"] = dict(config_mapping(config))
            if alias in (cluster := topology()):  # a ReplicaRouter watches this alias
                info["cluster"] = cluster[alias]
            try:
                pool = get_pool(alias)
                with pool.connection(tag="poolkit_status") as conn:
                    row = conn.execute(_SERVER_SQL).fetchone()
                    by_app = conn.execute(_BY_APP_SQL).fetchall()
                assert row is not None
                info["server"] = {
                    "max_connections": row[0],
                    "connections_total": row[1],
                    "connections_to_database": row[2],
                    "database": row[3],
                    "by_application_and_state": [list(r) for r in by_app],
                }
                info["status"] = "ok"
                info["stats"] = pool.stats()
            except Exception as exc:
                info["status"] = f"error: {type(exc).__name__}: {exc}"
            report[alias] = info
        return report

    def _print(self, alias: str, info: dict[str, Any]) -> None:
        w = self.stdout.write
        w(self.style.MIGRATE_HEADING(f"{alias}: {info.get('status', '?')}"))
        if "remote" in info:
            w(f"  from {info['remote']}")
            if "error" in info:
                w(f"  error: {info['error']}")
            elif "reason" in info:
                w(f"  reason: {info['reason']} (details in the server's log)")
        if "database" in info:
            w(f"  database: {info['database']}")
        if "settings" in info:
            w("  settings: " + " ".join(f"{k}={v!r}" for k, v in info["settings"].items()))
        cluster = info.get("cluster")
        if cluster:
            lag = "" if cluster["lag"] is None else f" lag={cluster['lag']:.2f} s"
            health = "healthy" if cluster["healthy"] else "down"
            w(f"  role: {cluster['role']} ({health}{lag})")
        stats = info.get("stats")
        if stats and "hosts" in stats:  # a multi-host HOST: one pool per server
            w(f"  primary: {stats['primary']} (failovers seen: {stats['failovers']})")
            for h in stats["hosts"]:
                lag = "" if h["lag"] is None else f" lag={h['lag']:.2f} s"
                health = "healthy" if h["healthy"] else f"down: {h['error']}"
                w(
                    f"  host {h['host']}: {h['role']} ({health}{lag}) size={h['size']} "
                    f"idle={h['idle']} in_use={h['in_use']} draining={h['draining']}"
                )
        elif stats:
            w(
                "  pool: size={size} (min {min_size}, max {max_size}) idle={idle} "
                "in_use={in_use} waiting={waiting}".format(**stats)
            )
            w(
                "  counters: borrows={borrows} timeouts={timeouts} rejected={rejected} "
                "created={connections_created} lost={connections_lost} "
                "leaks={leaks_detected}".format(**stats)
            )
            for key in ("wait_time", "hold_time"):
                h = stats[key]
                w(
                    f"  {key}: count={h['count']} p50={h['p50'] * 1000:.2f} ms "
                    f"p99={h['p99'] * 1000:.2f} ms max={h['max'] * 1000:.2f} ms"
                )
        server = info.get("server")
        if server:
            w(
                f"  server: max_connections={server['max_connections']}, "
                f"{server['connections_total']} client connections, "
                f"{server['connections_to_database']} to {server['database']!r}"
            )
            for app, state, count in server["by_application_and_state"]:
                w(f"    {count:4d}  {state:<20} {app}")
