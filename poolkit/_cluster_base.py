"""What ClusterPool and AsyncClusterPool share without I/O: hosts, roles, routing, stats."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from time import monotonic
from typing import Any, TypedDict

from ._cluster_hosts import split_hosts
from ._config import PoolConfig
from ._errors import ConfigError, ConnectFailed, PoolTimeout
from ._messages import describe_error, permanent_fix

# split_hosts lives in _cluster_hosts; it stays importable from here for poolkit_django.
__all__ = ["ClusterCore", "ClusterStats", "Host", "HostStats", "split_hosts"]

logger = logging.getLogger("poolkit.cluster")

READ_POLICIES = ("least_busy", "round_robin", "random")
FALLBACKS = ("primary", "error")
# psycopg's commit() of a failed transaction rolls back silently: say so instead.
FAILED_TX = (
    "a statement failed inside this connection() block and its error was caught: "
    "the transaction was rolled back, nothing was committed"
)


class HostStats(TypedDict):
    """One host of `ClusterPool.stats()`; every key is documented in docs/cluster.md."""

    host: str
    role: str  # "primary", "replica" or "unknown" (never reached yet)
    healthy: bool
    lag: float | None  # seconds behind the primary, replicas only
    checked_ago: float | None  # seconds since the last successful probe
    error: str | None
    size: int
    idle: int
    in_use: int
    parked: int
    waiting: int
    draining: int  # connections lent before a role change, closed when they come back
    borrows: int
    timeouts: int


class ClusterStats(TypedDict):
    """What `ClusterPool.stats()` returns: one entry per host and the totals."""

    name: str
    primary: str | None
    hosts: list[HostStats]
    size: int
    idle: int
    in_use: int
    parked: int
    waiting: int
    draining: int
    failovers: int  # role changes seen since the pool opened
    reads_on_primary: int  # reads sent to the primary because no replica qualified


class Host:
    """One server of the cluster: its current pool, role and health, as the monitor sees it."""

    __slots__ = (
        "checked_at",
        "config",
        "conninfo",
        "error",
        "fix",
        "healthy",
        "label",
        "lag",
        "pool",
        "pool_role",
        "probe",
        "retired",
        "role",
        "wake",
        "worker",
    )  # fmt: skip

    def __init__(self, label: str, conninfo: str, config: PoolConfig) -> None:
        self.label = label
        self.conninfo = conninfo
        self.config = config
        self.pool: Any = None  # lends only while pool_role is the current role
        self.pool_role: str | None = None
        self.role = "unknown"
        self.healthy = False
        self.lag: float | None = None
        self.checked_at: float | None = None
        self.error: str | None = None
        self.fix: str | None = None  # set when the last error is one retrying cannot cure
        self.wake = False  # set by borrowers on a telling error: probe now
        self.probe: Any = None  # dedicated connection of the monitor
        self.retired: list[Any] = []  # pools of an old role with connections still lent
        self.worker: Any = None

    def __repr__(self) -> str:
        state = "healthy" if self.healthy else "down"
        return f"<Host {self.label} {self.role} {state}>"

    def describe(self) -> str:
        if self.healthy:
            lag = f", lag {self.lag:.1f} s" if self.role == "replica" and self.lag else ""
            return f"{self.label} ({self.role}{lag})"
        return f"{self.label} ({self.role}, down: {self.error or 'not reached yet'})"


class Lent:
    """Where a lent connection goes back to, and what its borrow changed on it."""

    __slots__ = ("host", "pool", "session_ro")

    def __init__(self, host: Host, pool: Any, session_ro: bool) -> None:
        self.host = host
        self.pool = pool
        self.session_ro = session_ro


class ClusterCore:
    """Mixin with the state and decisions of a cluster pool that need no I/O."""

    name: str
    hosts: list[Host]

    def _cl_init(
        self,
        conninfo: str | Sequence[str],
        config: PoolConfig | None,
        settings: dict[str, Any],
        topology_interval: float,
        max_replica_lag: float,
        read_policy: str,
        fallback: str,
    ) -> None:
        for setting, number in (
            ("topology_interval", topology_interval), ("max_replica_lag", max_replica_lag),
        ):  # fmt: skip
            if isinstance(number, bool) or not isinstance(number, int | float) or number <= 0:
                raise ConfigError(setting, number, "must be a positive number of seconds",
                                  f"use for example {setting}=1.0")  # fmt: skip
        if read_policy not in READ_POLICIES:
            raise ConfigError("read_policy", read_policy, "is unknown",
                              f"use one of {', '.join(READ_POLICIES)}")  # fmt: skip
        if fallback not in FALLBACKS:
            raise ConfigError("fallback", fallback, "is unknown",
                              f"use one of {', '.join(FALLBACKS)}")  # fmt: skip
        if not conninfo and config is not None:
            conninfo = config.conninfo
        base = PoolConfig.from_dict(settings, source=f"{type(self).__name__}()") if config is None \
            else config.replace(**settings) if settings else config  # fmt: skip
        name = base.name or f"cluster-{id(self) & 0xFFFF:x}"
        self.name = name
        self.config = base
        self.topology_interval = float(topology_interval)
        self.max_replica_lag = float(max_replica_lag)
        self.read_policy = read_policy
        self.fallback = fallback
        self.timeout = base.timeout
        self.hosts = [
            Host(label, ci, base.replace(conninfo=ci, name=f"{name}[{label}]"))
            for label, ci in split_hosts(conninfo)
        ]
        self._cl_opened = False
        self._cl_closed = False
        self._cl_pid = os.getpid()
        self._cl_orphans: list[Any] = []  # a parent's probe connections, never touched
        self._cl_rr = 0
        self._cl_failovers = 0
        self._cl_reads_on_primary = 0
        self._cl_waiting_primary = 0

    # -- routing ------------------------------------------------------------------------

    def primary(self) -> Host | None:
        """The host currently taking writes, if the monitor sees one."""
        for host in self.hosts:
            if host.healthy and host.role == "primary" and host.pool is not None:
                return host
        return None

    def _cl_route(self, read_only: bool) -> Host | None:
        """The host the next borrow goes to, or None to wait for the topology to change."""
        if not read_only:
            return self.primary()
        ready = [
            h for h in self.hosts
            if h.healthy and h.role == "replica" and h.pool is not None
            and h.lag is not None and h.lag <= self.max_replica_lag
        ]  # fmt: skip
        if ready:
            if len(ready) == 1:
                return ready[0]
            if self.read_policy == "round_robin":
                self._cl_rr += 1
                return ready[self._cl_rr % len(ready)]
            if self.read_policy == "random":
                return random.choice(ready)
            # Fewest connections in use (parked ones left out, as in the pool's in_use).
            return min(ready, key=lambda h: h.pool._n_in_use())
        if self.fallback == "error":
            return None
        host = self.primary()
        if host is not None:
            self._cl_reads_on_primary += 1
        return host

    def _cl_no_host(self, read_only: bool, waited: float) -> PoolTimeout:
        what = "primary"
        if read_only:
            what = "replica within max_replica_lag"
            if self.fallback == "primary":
                what += " and no primary"
        hosts = "; ".join(h.describe() for h in self.hosts)
        return PoolTimeout(
            f"cluster {self.name!r}: found no {what} in {waited:.2f} s "
            f"(max_replica_lag={self.max_replica_lag}); hosts: {hosts}"
        )

    def _cl_record_error(self, host: Host, exc: BaseException) -> None:
        host.error = describe_error(exc)
        host.fix = permanent_fix(exc)

    def _cl_connect_failed(self) -> ConnectFailed | None:
        """ConnectFailed when every host fails for a reason waiting will not fix."""
        if not self.hosts or any(h.healthy or h.fix is None for h in self.hosts):
            return None
        why = "; ".join(f"{h.label}: {h.error} ({h.fix})" for h in self.hosts)
        return ConnectFailed(f"cluster {self.name!r} cannot connect to any host: {why}")

    def _cl_apply_probe(self, host: Host, row: Any) -> bool:
        """Record a probe's answer; True when the role differs from the one lent from."""
        in_recovery, read_only, lag = row
        # A primary with default_transaction_read_only on takes no writes (an Aurora
        # writer being flipped to reader): route it as a replica.
        role = "replica" if in_recovery or read_only else "primary"
        host.lag = float(lag) if role == "replica" else None
        host.checked_at = monotonic()
        host.error = host.fix = None
        changed = host.role != role or not host.healthy
        if host.role != role and host.role != "unknown":
            self._cl_failovers += 1
        host.role = role
        host.healthy = True
        return changed

    # -- stats --------------------------------------------------------------------------

    def stats(self) -> ClusterStats:
        """A snapshot: one entry per host (role, health, lag, pool gauges) and the totals."""
        now = monotonic()
        hosts: list[HostStats] = []
        for h in self.hosts:
            s = h.pool.stats() if h.pool is not None else None
            draining = sum(p.stats()["in_use"] for p in h.retired)
            hosts.append({
                "host": h.label,
                "role": h.role,
                "healthy": h.healthy,
                "lag": h.lag,
                "checked_ago": None if h.checked_at is None else now - h.checked_at,
                "error": h.error,
                "size": s["size"] if s else 0,
                "idle": s["idle"] if s else 0,
                "in_use": s["in_use"] if s else 0,
                "parked": s["parked"] if s else 0,
                "waiting": s["waiting"] if s else 0,
                "draining": draining,
                "borrows": s["borrows"] if s else 0,
                "timeouts": s["timeouts"] if s else 0,
            })  # fmt: skip
        primary = self.primary()
        return {
            "name": self.name,
            "primary": primary.label if primary else None,
            "hosts": hosts,
            "size": sum(h["size"] for h in hosts),
            "idle": sum(h["idle"] for h in hosts),
            "in_use": sum(h["in_use"] for h in hosts),
            "parked": sum(h["parked"] for h in hosts),
            "waiting": sum(h["waiting"] for h in hosts) + self._cl_waiting_primary,
            "draining": sum(h["draining"] for h in hosts),
            "failovers": self._cl_failovers,
            "reads_on_primary": self._cl_reads_on_primary,
        }

    def host_pools(self) -> dict[str, Any]:
        """The current pool of every reachable host, by pool name ("name[host:port]")."""
        return {h.pool.name: h.pool for h in self.hosts if h.pool is not None}

    def __repr__(self) -> str:
        hosts = ", ".join(h.describe() for h in self.hosts)
        return f"<{type(self).__name__} {self.name!r} [{hosts}]>"


def flatten_pools(pools: Any) -> dict[str, Any]:
    """`pools` with every cluster replaced by its hosts' pools (for metrics and dashboards)."""
    out: dict[str, Any] = {}
    for key, pool in list(pools.items()):
        if hasattr(pool, "host_pools"):
            out.update(pool.host_pools())
        else:
            out[key] = pool
    return out
