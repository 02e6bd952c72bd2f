"""The `poolkit` console script: `poolkit doctor` sizes a fleet's pools against the server."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any, TextIO

import psycopg

from ._config import PoolConfig, mask_conninfo
from ._version import __version__

APP_NAME = "poolkit-doctor"
EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_ERROR = 0, 1, 2
# Below this per-process max_size a direct fleet is too starved to be worth it.
MIN_USEFUL_MAX_SIZE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `poolkit` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_ERROR
    return int(args.run(args, sys.stdout, sys.stderr))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poolkit", description=__doc__)
    parser.add_argument("--version", action="version", version=f"poolkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    doctor = sub.add_parser(
        "doctor",
        help="check that a fleet's pools fit the server's connection limits",
        description="Connect to PostgreSQL, report its limits, current connections and "
        "connect vs query cost, and check that hosts x processes x max_size fits. Exit "
        "status: 0 fits, 1 does not fit, 2 error.",
    )
    doctor.add_argument("url", nargs="?", help="database URL (default: $DATABASE_URL)")
    doctor.add_argument("--hosts", type=_positive, default=1, help="machines (default 1)")
    doctor.add_argument(
        "--processes", type=_positive, default=1, help="app processes per host (default 1)"
    )
    doctor.add_argument(
        "--max-size",
        type=_positive,
        default=PoolConfig().resolved_max_size,
        help="max_size of each process's pool (default: poolkit's, %(default)s)",
    )
    doctor.add_argument(
        "--pools-per-process",
        type=_positive,
        default=1,
        metavar="N",
        help="pools per process on this database, each of max_size (default 1)",
    )
    doctor.add_argument(
        "--application-name",
        metavar="NAME",
        help="application_name of the fleet: its current connections are not counted as "
        "used by others (they are part of the plan)",
    )
    doctor.add_argument(
        "--headroom",
        type=_non_negative,
        metavar="N",
        help="slots kept free for psql, migrations, cron and deploy overlap "
        "(default: 10%% of the usable slots, at least 3)",
    )
    doctor.add_argument("--samples", type=_positive, default=5, help="connects to time (default 5)")
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    doctor.set_defaults(run=_doctor)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not 1 or more")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _doctor(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    url = args.url or os.environ.get("DATABASE_URL", "")
    if not url:
        print("poolkit doctor: give a database URL or set DATABASE_URL", file=err)
        return EXIT_ERROR
    try:
        report = diagnose(
            url,
            hosts=args.hosts,
            processes=args.processes,
            max_size=args.max_size,
            pools_per_process=args.pools_per_process,
            application_name=args.application_name,
            headroom=args.headroom,
            samples=args.samples,
        )
    except psycopg.Error as exc:
        print(
            f"poolkit doctor: cannot use {mask_conninfo(url)}: {mask_conninfo(str(exc).strip())}",
            file=err,
        )
        return EXIT_ERROR
    if args.json:
        json.dump(report, out, indent=2)
        out.write("\n")
    else:
        out.write(format_report(report))
    return EXIT_FITS if report["plan"]["fits"] else EXIT_DOES_NOT_FIT


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


def diagnose(
    url: str,
    *,
    hosts: int = 1,
    processes: int = 1,
    max_size: int = 4,
    pools_per_process: int = 1,
    application_name: str | None = None,
    headroom: int | None = None,
    samples: int = 5,
) -> dict[str, Any]:
    """Everything `poolkit doctor` reports, as a JSON-able dict (see docs/operations.md)."""
    connect: list[float] = []
    for _ in range(samples):
        t0 = time.perf_counter()
        conn = psycopg.connect(url, autocommit=True, application_name=APP_NAME, connect_timeout=10)
        connect.append(time.perf_counter() - t0)
        conn.close()
    with psycopg.connect(
        url, autocommit=True, application_name=APP_NAME, connect_timeout=10
    ) as conn:
        round_trip = []
        for _ in range(max(20, samples)):
            t0 = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            round_trip.append(time.perf_counter() - t0)
        server = _server(conn)
        limits = _limits(conn, server["version_num"])
        rows = conn.execute(
            "SELECT coalesce(application_name, ''), coalesce(state, '(hidden)'), count(*)"
            " FROM pg_stat_activity WHERE backend_type = 'client backend'"
            " AND pid <> pg_backend_pid() GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2"
        ).fetchall()
    by_app = [{"application_name": a, "state": s, "count": int(n)} for a, s, n in rows]
    total = sum(r["count"] for r in by_app)
    fleet_now = sum(r["count"] for r in by_app if r["application_name"] == application_name)
    connections = {
        "total": total,
        "by_application": by_app,
        "fleet": fleet_now if application_name is not None else None,
        "others": total - fleet_now,
    }
    timing = {
        "connect_ms": _median_ms(connect),
        "round_trip_ms": _median_ms(round_trip),
        "connect_samples": len(connect),
        "round_trip_samples": len(round_trip),
    }
    timing["pooling_saves_ms"] = round(timing["connect_ms"] - timing["round_trip_ms"], 3)
    plan, recommendation = _plan(
        limits,
        connections["others"],
        hosts=hosts,
        processes=processes,
        max_size=max_size,
        pools_per_process=pools_per_process,
        headroom=headroom,
        application_name=application_name,
    )
    server["url"] = mask_conninfo(url)
    return {
        "server": server,
        "limits": limits,
        "connections": connections,
        "timing": timing,
        "plan": plan,
        "recommendation": recommendation,
    }


def _server(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    version, user, database, superuser = conn.execute(
        "SELECT current_setting('server_version'), current_user, current_database(),"
        " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)"
    ).fetchone() or ("?", "?", "?", False)
    return {
        "version": version,
        "version_num": conn.info.server_version,
        "user": user,
        "database": database,
        "superuser": bool(superuser),
    }


def _limits(conn: psycopg.Connection[Any], version_num: int) -> dict[str, Any]:
    def setting(name: str) -> int:
        row = conn.execute("SELECT current_setting(%s)::int", (name,)).fetchone()
        return int(row[0]) if row else 0

    max_conn = setting("max_connections")
    su_reserved = setting("superuser_reserved_connections")
    # PostgreSQL 16 added slots reserved for roles granted pg_use_reserved_connections.
    reserved = setting("reserved_connections") if version_num >= 160000 else None
    row = conn.execute(
        "SELECT r.rolconnlimit, d.datconnlimit FROM pg_roles r, pg_database d"
        " WHERE r.rolname = current_user AND d.datname = current_database()"
    ).fetchone()
    role_limit, db_limit = (row[0], row[1]) if row else (-1, -1)
    server_usable = max_conn - su_reserved - (reserved or 0)
    usable = server_usable
    limited_by = "max_connections"
    for label, limit in (("role", role_limit), ("database", db_limit)):
        if limit is not None and limit >= 0 and limit < usable:
            usable, limited_by = limit, f"{label} CONNECTION LIMIT"
    return {
        "max_connections": max_conn,
        "superuser_reserved_connections": su_reserved,
        "reserved_connections": reserved,
        "role_connection_limit": None if role_limit is None or role_limit < 0 else role_limit,
        "database_connection_limit": None if db_limit is None or db_limit < 0 else db_limit,
        "usable": usable,
        "limited_by": limited_by,
    }


def _plan(
    limits: dict[str, Any],
    others: int,
    *,
    hosts: int,
    processes: int,
    max_size: int,
    pools_per_process: int,
    headroom: int | None,
    application_name: str | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    usable = limits["usable"]
    if headroom is None:
        headroom = max(3, usable // 10)
    available = max(0, usable - others - headroom)
    per_process = max_size * pools_per_process
    clients = hosts * processes * pools_per_process
    planned = hosts * processes * per_process
    fits = planned <= available
    plan = {
        "hosts": hosts,
        "processes": processes,
        "pools_per_process": pools_per_process,
        "max_size": max_size,
        "connections": planned,
        "usable": usable,
        "others": others,
        "headroom": headroom,
        "available": available,
        "fits": fits,
        "spare": available - planned,
    }
    best = available // clients
    reasoning = []
    su, res = limits["superuser_reserved_connections"], limits["reserved_connections"]
    line = f"usable slots: max_connections {limits['max_connections']} - superuser_reserved {su}"
    if res is not None:
        line += f" - reserved_connections {res}"
    line += f" = {limits['max_connections'] - su - (res or 0)}"
    reasoning.append(line)
    if limits["limited_by"] != "max_connections":
        reasoning.append(f"the {limits['limited_by']} lowers that to {usable}")
    whose = (
        f"connections not named {application_name!r}"
        if application_name is not None
        else "every client connection but this one; pass --application-name to exclude the "
        "fleet's own"
    )
    reasoning.append(f"in use by others now: {others} ({whose})")
    reasoning.append(
        f"headroom for psql, migrations, cron jobs and deploy overlap: {headroom} (--headroom)"
    )
    reasoning.append(f"available to the fleet: {usable} - {others} - {headroom} = {available}")
    shape = f"{hosts} host(s) x {processes} process(es)"
    if pools_per_process > 1:
        shape += f" x {pools_per_process} pools"
    verdict = "fits" if fits else "does NOT fit"
    sign = "<=" if fits else ">"
    reasoning.append(
        f"planned: {shape} x max_size {max_size} = {planned} {sign} {available}: {verdict}"
    )
    reasoning.append(f"largest max_size that fits: floor({available} / {clients}) = {best}")
    pgbouncer = best < MIN_USEFUL_MAX_SIZE
    if pgbouncer:
        reasoning.append(
            f"that leaves under {MIN_USEFUL_MAX_SIZE} connections per pool: put PgBouncer in "
            "transaction mode in front of the server (pgbouncer=True in poolkit), give each "
            "process the max_size it needs, and keep PgBouncer's server connections "
            f"(default_pool_size per database and user, times the PgBouncer instances) within "
            f"{available}"
        )
    else:
        reasoning.append(
            f"use max_size <= {best}; more connections per process than its concurrent "
            "workers (threads, in-flight requests) only add idle backends"
        )
    recommendation = {"max_size": best, "pgbouncer": pgbouncer, "reasoning": reasoning}
    return plan, recommendation


def format_report(report: dict[str, Any]) -> str:
    """The human-readable form of a `diagnose()` report."""
    s, lim, conns, t = report["server"], report["limits"], report["connections"], report["timing"]
    plan, rec = report["plan"], report["recommendation"]
    lines = [
        f"server      {s['url']}",
        f"            PostgreSQL {s['version']}, user {s['user']}"
        f"{' (superuser)' if s['superuser'] else ''}, database {s['database']}",
        "",
        "limits      max_connections                 " + f"{lim['max_connections']:>6}",
        "            superuser_reserved_connections  "
        + f"{lim['superuser_reserved_connections']:>6}",
    ]
    if lim["reserved_connections"] is not None:
        lines.append(
            "            reserved_connections            " + f"{lim['reserved_connections']:>6}"
        )
    for key, label in (
        ("role_connection_limit", "role CONNECTION LIMIT"),
        ("database_connection_limit", "database CONNECTION LIMIT"),
    ):
        if lim[key] is not None:
            lines.append(f"            {label:<32}{lim[key]:>6}")
    lines.append("            usable by ordinary clients      " + f"{lim['usable']:>6}")
    lines += ["", f"connections {conns['total']} now (excluding this one)"]
    width = max([len(r["application_name"] or "(none)") for r in conns["by_application"]] + [16])
    for r in conns["by_application"]:
        name = r["application_name"] or "(none)"
        lines.append(f"            {name:<{width}}  {r['state']:<20} {r['count']:>5}")
    ratio = t["connect_ms"] / t["round_trip_ms"] if t["round_trip_ms"] else float("inf")
    lines += [
        "",
        f"timing      connect {t['connect_ms']:.2f} ms (median of {t['connect_samples']}),"
        f" SELECT 1 {t['round_trip_ms']:.3f} ms (median of {t['round_trip_samples']})",
        f"            a pooled borrow saves ~{t['pooling_saves_ms']:.2f} ms per request"
        f" ({ratio:.0f}x a query round trip)",
        "",
        f"plan        {plan['hosts']} host(s) x {plan['processes']} process(es) x "
        f"max_size {plan['max_size']}"
        + (f" x {plan['pools_per_process']} pools" if plan["pools_per_process"] > 1 else "")
        + f" = {plan['connections']} connections; {plan['available']} available",
        f"            {'OK: fits' if plan['fits'] else 'PROBLEM: does not fit'}"
        f" ({plan['spare']:+d} spare)",
        "",
        f"recommend   max_size = {rec['max_size']}"
        + ("  (and PgBouncer in transaction mode)" if rec["pgbouncer"] else ""),
    ]
    for reason in rec["reasoning"]:
        lines.append(
            textwrap.fill(
                reason,
                96,
                initial_indent=" " * 12 + "- ",
                subsequent_indent=" " * 14,
                break_on_hyphens=False,
            )
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
