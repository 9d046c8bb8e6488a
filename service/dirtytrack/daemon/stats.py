"""What a target's scans produced, kept for the metrics endpoint (metrics.py).

Written by the event loop after each scan (registry.Target), read by
Prometheus scrapes from the HTTP server's thread. No prometheus_client here:
the registry records, metrics.py exports.
"""
from __future__ import annotations

import collections
import threading
import time

from dirtytrack._core import PAGE_SIZE

# Scan durations: a small target scans in ~10 µs, a 16 GiB one in milliseconds.
SCAN_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025,
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RATE_WINDOW_S = 10.0        # dirtytrack_target_dirty_bytes_per_second: the scans of the last 10 s
STATS_WINDOW_S = 60.0       # mean / variance of the dirty rate: the scans of the last minute
MAX_SAMPLES = 6000          # 60 s at the fastest 10 ms interval
# Why a scan's report was a full resync (ProcessDirtySet event codes), plus a
# scan that raised. All are exported from 0 so rate()/increase() see the first one.
RESYNC_REASONS = ("lost", "exec", "exited", "error", "scan_failed")


def read_comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


class ScanStats:
    """What a target's scans produced. Written by the event loop, read by scrapes."""

    def __init__(self, pid: int):
        self.pid = pid
        # The name at attach, kept for the target's life: a label that changed on exec()
        # would start new series mid-count, and increase() would miss the exec itself.
        self.comm = read_comm(pid)
        self.started_mono_ns = time.monotonic_ns()
        self.prev_scan_mono_ns = self.started_mono_ns
        self.dirty_pages_total = 0
        self.lost_mappings_total = 0
        self.scan_errors_total = 0
        self.resyncs = dict.fromkeys(RESYNC_REASONS, 0)
        self.tracked_bytes = 0
        self.buckets = [0] * len(SCAN_BUCKETS)    # non-cumulative, per bucket
        self.duration_count = 0
        self.duration_sum = 0.0
        # (end of interval mono ns, interval seconds, dirty bytes in it)
        self.samples: collections.deque = collections.deque(maxlen=MAX_SAMPLES)
        self._lock = threading.Lock()              # samples: appended here, read by scrapes

    def set_tracked(self, mappings) -> None:
        self.tracked_bytes = sum(m.end - m.start for m in mappings
                                 if getattr(m, "status", "") != "removed")

    def record_scan(self, report, started_mono_ns: int, duration_s: float) -> None:
        pages = report.count
        self.dirty_pages_total += pages
        self.lost_mappings_total += sum(1 for m in report.mappings if m.status == "lost")
        for code in {code for code, _ in report.events}:
            self.resyncs[code] = self.resyncs.get(code, 0) + 1
        self.set_tracked(report.mappings)
        self._duration(duration_s)
        # The pages were written between the previous scan's reset and this one's.
        interval = (started_mono_ns - self.prev_scan_mono_ns) / 1e9
        self.prev_scan_mono_ns = started_mono_ns
        if interval > 0:
            with self._lock:
                self.samples.append((started_mono_ns, interval, pages * PAGE_SIZE))

    def record_failure(self, duration_s: float) -> None:
        self.scan_errors_total += 1
        self.resyncs["scan_failed"] += 1
        self._duration(duration_s)

    def _duration(self, seconds: float) -> None:
        self.duration_count += 1
        self.duration_sum += seconds
        for i, bound in enumerate(SCAN_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1
                break

    def histogram(self) -> list[tuple[str, float]]:
        out, acc = [], 0
        for bound, n in zip(SCAN_BUCKETS, self.buckets):
            acc += n
            out.append((repr(float(bound)), acc))
        out.append(("+Inf", self.duration_count))
        return out

    def window(self, seconds: float, now_ns: int | None = None) -> list[tuple[float, float]]:
        """(interval seconds, dirty bytes) of the scans that ended in the last `seconds`
        (at least the last scan)."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        with self._lock:
            samples = list(self.samples)
        edge = now_ns - int(seconds * 1e9)
        picked = [(dt, b) for end, dt, b in samples if end >= edge]
        if not picked and samples:
            picked = [samples[-1][1:]]
        return picked

    def rate(self, seconds: float = RATE_WINDOW_S) -> float:
        picked = self.window(seconds)
        total = sum(dt for dt, _ in picked)
        return sum(b for _, b in picked) / total if total > 0 else 0.0

    def mean_variance(self, seconds: float = STATS_WINDOW_S) -> tuple[float, float, float]:
        """Time-weighted mean and variance of the per-scan dirty rate (bytes/s, (bytes/s)^2)
        over the window, and the seconds the window really covers."""
        picked = self.window(seconds)
        total = sum(dt for dt, _ in picked)
        if total <= 0:
            return 0.0, 0.0, 0.0
        mean = sum(b for _, b in picked) / total
        var = sum(dt * (b / dt - mean) ** 2 for dt, b in picked) / total
        return mean, var, total
