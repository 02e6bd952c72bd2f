"""How a cluster learns a host's role: the probe, and the signs that call for one sooner."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ._config import PoolConfig

__all__ = [
    "FAST_PROBE",
    "PROBE_SQL",
    "probe_kwargs",
    "reports_read_only",
    "reveals_change",
]

# One round trip per host per interval. Lag is measured on the replica itself; a replica
# that has replayed everything it received has nothing to catch up on: lag 0, whatever
# the age of the last transaction (an idle primary writes no WAL); one with WAL to replay
# and nothing replayed since it started is as late as its uptime.
PROBE_SQL = """\
SELECT pg_is_in_recovery(),
       current_setting('default_transaction_read_only') = 'on',
       CASE WHEN NOT pg_is_in_recovery() THEN 0.0
            WHEN pg_last_wal_receive_lsn() IS NOT NULL
                 AND pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0.0
            ELSE EXTRACT(epoch FROM now() - COALESCE(pg_last_xact_replay_timestamp(),
                                                     pg_postmaster_start_time()))
       END::float8"""
# Probe connections connect fast or not at all (libpq's minimum is 2 s).
PROBE_CONNECT_TIMEOUT = 2
# While borrowers wait for a primary, probe this often instead of every topology_interval.
FAST_PROBE = 0.1


def probe_kwargs(config: PoolConfig) -> dict[str, Any]:
    """Connect arguments of the monitor's own connection to a host."""
    kwargs = config.connect_kwargs()
    kwargs["autocommit"] = True
    kwargs.pop("prepare_threshold", None)
    if "connect_timeout" not in conninfo_to_dict(config.conninfo, **kwargs):
        kwargs["connect_timeout"] = PROBE_CONNECT_TIMEOUT
    return kwargs


# Errors whose arrival means the host may have changed role or gone away: recheck now.
_CHANGE_STATES = frozenset(
    {"25006", "57P01", "57P02", "57P03", "08000", "08001", "08003", "08006", "08P01"}
)


def reveals_change(exc: BaseException | None, conn: Any = None) -> bool:
    """True when an error (or a broken connection) hints that a host changed or went away."""
    if conn is not None and (conn.broken or conn.closed):
        return True
    if isinstance(exc, psycopg.Error):
        return (exc.sqlstate or "") in _CHANGE_STATES or isinstance(exc, psycopg.OperationalError)
    return False


def reports_read_only(conn: Any) -> bool:
    """True when the server told this session it no longer takes writes (no I/O here).

    PostgreSQL 14+ reports both settings to the client whenever they change: on a reload
    that turns default_transaction_read_only on (the Aurora-style writer flip), the session
    learns it at its next statement, before the monitor's next probe.
    """
    info = conn.info
    return bool(
        info.parameter_status("default_transaction_read_only") == "on"
        or info.parameter_status("in_hot_standby") == "on"
    )
