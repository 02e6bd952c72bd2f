"""The dashboard's rolling history: each pool's recent samples and events, kept per process."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DashboardHistory"]

PoolsSource = Mapping[str, Any] | Callable[[], Mapping[str, Any]]
# Events kept per pool, beyond the few the pool keeps itself, so that the window's outages
# and recoveries outlast a burst of timeouts (see _keep_events).
MAX_KEPT_EVENTS = 1000


@dataclass(frozen=True, slots=True)
class _Sample:
    t: float  # monotonic
    size: int
    in_use: int
    idle: int
    waiting: int
    borrows: int
    timeouts: int


class DashboardHistory:
    """A rolling record of each pool's size/in_use/idle/waiting, for the dashboard's chart.

    The integration owns one per process. `pools` is a mapping of pools or a callable
    returning one (such as ``poolkit_django.pools``), read at every sample. `start()`
    samples every `interval` seconds in a daemon thread (sampling reads counters only, no
    I/O), or call `sample()` yourself. `dashboard_snapshot()` also samples when a sample is
    due, so the chart fills while the page is open even without the thread. Start it in
    the serving process: after a fork, the thread does not exist in the child.
    """

    def __init__(
        self, pools: PoolsSource | None = None, *, interval: float = 1.0, window: float = 300.0
    ) -> None:
        if interval <= 0 or window < interval:
            raise ValueError(
                f"interval={interval!r}, window={window!r}: use interval > 0 and window >= interval"
            )
        self.pools = pools
        self.interval = interval
        self.window = window
        self._samples: dict[str, deque[_Sample]] = {}
        self._events: dict[str, deque[tuple[float, str, str]]] = {}
        self._lock = threading.Lock()
        self._last = -float("inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fork_hook = False

    def _current(self, pools: Mapping[str, Any] | None) -> Mapping[str, Any]:
        source = self.pools if pools is None else pools
        if source is None:
            return {}
        return source() if callable(source) else source

    def sample(self, pools: Mapping[str, Any] | None = None, now: float | None = None) -> None:
        """Record one sample of every pool now (of `pools`, or of the ones given at init)."""
        if now is None:
            now = time.monotonic()
        if pools is None and self.pools is None:
            return  # nothing to sample yet: keep what snapshots recorded
        current = self._current(pools)
        keep = int(self.window / self.interval) + 1
        with self._lock:
            self._last = now
            for key, pool in list(current.items()):
                st = pool.stats()
                series = self._samples.get(str(key))
                if series is None:
                    series = self._samples[str(key)] = deque(maxlen=keep)
                series.append(
                    _Sample(
                        now,
                        st["size"],
                        st["in_use"],
                        st["idle"],
                        st["waiting"],
                        st["borrows"],
                        st["timeouts"],
                    )
                )
                self._keep_events(str(key), pool.events())
            for key in set(self._samples) - {str(k) for k in current}:
                del self._samples[key]  # a pool that went away
                self._events.pop(key, None)

    def _keep_events(self, key: str, events: list[tuple[float, str, str]]) -> None:
        # The pool keeps its last events only: copy the new ones, so an outage seen by one
        # sample stays listed after a burst of timeouts has pushed it out of the pool's list.
        kept = self._events.get(key)
        if kept is None:
            kept = self._events[key] = deque(maxlen=MAX_KEPT_EVENTS)
        last = kept[-1][0] if kept else -float("inf")
        kept.extend(e for e in events if e[0] > last)

    def events(self, key: str, now: float | None = None) -> list[tuple[float, str, str]]:
        """Every event of one pool seen within the window, oldest first."""
        if now is None:
            now = time.monotonic()
        with self._lock:
            kept = list(self._events.get(key, ()))
        return [e for e in kept if now - e[0] <= self.window]

    def sample_if_due(self, pools: Mapping[str, Any] | None = None) -> None:
        """Sample unless the last sample is younger than `interval`."""
        now = time.monotonic()
        if now - self._last >= self.interval * 0.9:
            self.sample(pools, now)

    def series(self, key: str, now: float | None = None) -> dict[str, list[float]]:
        """One pool's samples as columns; `t` is seconds relative to now (negative)."""
        if now is None:
            now = time.monotonic()
        with self._lock:
            samples = list(self._samples.get(key, ()))
        samples = [s for s in samples if now - s.t <= self.window]
        return {
            "t": [round(s.t - now, 3) for s in samples],
            "size": [s.size for s in samples],
            "in_use": [s.in_use for s in samples],
            "idle": [s.idle for s in samples],
            "waiting": [s.waiting for s in samples],
            "borrows": [s.borrows for s in samples],
            "timeouts": [s.timeouts for s in samples],
        }

    def start(self) -> None:
        """Sample every `interval` seconds in a daemon thread until `stop()`.

        A forked child (gunicorn --preload) starts its own thread: threads do not survive
        a fork, and the child's pools are its own.
        """
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="poolkit-dashboard", daemon=True)
        self._thread.start()
        if not self._fork_hook:
            self._fork_hook = True
            me = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: _restart_in_child(me))

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(5.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            # A pool closing under us must not end the sampling.
            with contextlib.suppress(Exception):
                self.sample()
            self._stop.wait(self.interval)


def _restart_in_child(ref: weakref.ref[DashboardHistory]) -> None:
    history = ref()
    if history is None or history._thread is None or history._stop.is_set():
        return  # gone, or not sampling in the parent
    history._lock = threading.Lock()  # the parent's may have been held by its thread
    history._samples.clear()  # the parent's pools, not the child's
    history._events.clear()
    history._thread = None
    history.start()
