"""Pool and AsyncPool's reports: stats(), psycopg_pool's get_stats(), histograms, borrows."""

from __future__ import annotations

from ._core import _COUNTERS, PoolCore
from ._leaks import BorrowInfo, borrow_infos
from ._stats import Histogram, PoolStats

_MAX_TAGS = 100
_OTHER_TAG = "(other)"


class Reporting(PoolCore):
    """Read-only views of a pool's state; the samples queued by borrows are folded here."""

    def _fold(self) -> None:
        """Move queued samples into the histograms (any thread; one folder at a time)."""
        with self._fold_lock:
            add = self._wait_hist.add
            q = self._wait_q
            while q:
                add(q.popleft())
            # Unparks are immediate borrows, queued because _unpark() takes no lock.
            uq, unparks = self._unparks, 0
            while uq:
                uq.popleft()
                unparks += 1
            if unparks:
                with self._lock:
                    self._n_fast += unparks
            tags = self._tag_hold
            hold = self._hold_hist.add
            hq = self._hold_q
            while hq:
                tag, held = hq.popleft()
                hold(held)
                if tag is not None:
                    th = tags.get(tag)
                    if th is None:
                        key = tag if len(tags) < _MAX_TAGS else _OTHER_TAG
                        th = tags.setdefault(key, Histogram())
                    th.add(held)

    def borrowed(self) -> list[BorrowInfo]:
        """The connections currently lent out, longest-held first."""
        with self._lock:
            slots = self._in_use()
        return borrow_infos(slots, self._leak_threshold)

    def events(self) -> list[tuple[float, str, str]]:
        """Recent pool events (monotonic time, kind, detail): losses, recoveries, timeouts."""
        return list(self._events)

    def histograms(self) -> dict[str, Histogram]:
        """Wait/hold/connect histograms (seconds) for metric exporters; wait_time is a copy."""
        self._fold()
        wait = Histogram()
        src = self._wait_hist
        wait.counts = list(src.counts)
        wait.counts[0] += self._n_fast  # immediate borrows are counted apart, see _borrow
        wait.count = src.count + self._n_fast
        wait.sum, wait.max = src.sum, src.max
        return {"wait_time": wait, "hold_time": self._hold_hist, "connect_time": self._connect_hist}

    def hold_time_by_tag(self) -> dict[str, Histogram]:
        """Hold-time histograms per borrow tag (route/view), at most 100 tags plus '(other)'."""
        self._fold()
        return dict(self._tag_hold)

    def stats(self) -> PoolStats:
        """A typed snapshot of the pool: gauges, counters and time summaries."""
        self._fold()
        with self._lock:
            size = self._nconns
            n_fast = self._n_fast
            return {
                "name": self.name,
                "size": size,
                "idle": len(self._idle),
                "in_use": self._n_in_use(),
                "parked": len(self._parked),
                "waiting": len(self._waiting),
                "min_size": self._min_size,
                "max_size": self._max_size,
                "overflow": max(0, size - self._min_size),
                "borrows": self._wait_hist.count + n_fast,
                "timeouts": self._n_timeouts,
                "rejected": self._n_rejected,
                "connections_created": self._n_created,
                "connections_closed": self._n_closed,
                "connections_failed": self._n_failed,
                "connections_lost": self._n_lost,
                "leaks_detected": self._n_leaks,
                "leaks_reclaimed": self._n_reclaimed,
                "validations_run": self._n_valid_run,
                "validations_skipped": self._n_valid_skip + (n_fast if self.config.validate else 0),
                "validations_failed": self._n_valid_fail,
                "resets": self._n_resets,
                "wait_time": self._wait_hist.summary(zeros=n_fast),
                "hold_time": self._hold_hist.summary(),
                "connect_time": self._connect_hist.summary(),
            }

    def get_stats(self) -> dict[str, int]:
        """psycopg_pool-compatible counters since the last pop_stats() (see its docs)."""
        out = self._psycopg_stats()
        for key in _COUNTERS:
            out[key] -= self._popped[key]
        return out

    def pop_stats(self) -> dict[str, int]:
        """Like get_stats(), then start the counters again from zero."""
        with self._pop_lock:
            now = self._psycopg_stats()
            out = dict(now)
            for key in _COUNTERS:
                out[key] -= self._popped[key]
                self._popped[key] = now[key]
        return out

    def _psycopg_stats(self) -> dict[str, int]:
        self._fold()
        w, h, c = self._wait_hist, self._hold_hist, self._connect_hist
        with self._lock:
            return {
                "pool_min": self._min_size,
                "pool_max": self._max_size,
                "pool_size": self._nconns,
                "pool_available": len(self._idle),
                "requests_waiting": len(self._waiting),
                "requests_num": w.count + self._n_fast + self._n_timeouts + self._n_rejected,
                "requests_queued": self._n_queued,
                "requests_wait_ms": int((w.sum + self._failed_wait) * 1000),
                "requests_errors": self._n_timeouts + self._n_rejected,
                "usage_ms": int(h.sum * 1000),
                "returns_bad": self._n_bad_returns,
                "connections_num": c.count + self._n_failed,
                "connections_ms": int(c.sum * 1000),
                "connections_errors": self._n_failed,
                "connections_lost": self._n_lost,
            }
