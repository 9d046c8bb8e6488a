"""Ground truth for "never under-report": writers log what they wrote, and
the log is checked page by page against what collects reported. Used by the
tests and by `dirtytrack demo`, which proves the promise live.

Ordering is captured with two counters kept under one lock:
  collects_finished  when a write *starts*    -> F
  collects_started   when a write *completes* -> S
A write must then be in one of the collects numbered F..S (collect S starts
after the write completed, so it must see it unless an earlier one that ran
concurrently already did). Collects before F ended before the write began and
cannot be expected to hold it.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable

__all__ = ["WriteLog"]


class WriteLog:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.collects_started = 0
        self.collects_finished = 0
        self.writes: list[tuple[int, int, int]] = []   # (page, F, S) not yet checked
        self.checked = 0                               # writes checked and forgotten
        self._collected: dict[int, set] = {}           # collect number -> pages

    def write(self, page: int, do_write: Callable[[], None]) -> None:
        """Run `do_write` (which writes `page`) and log it with its window."""
        with self.lock:
            first = self.collects_finished
        do_write()
        with self.lock:
            self.writes.append((page, first, self.collects_started))

    def collect(self, do_collect: Callable[[], Iterable[int]]) -> set:
        """Run `do_collect` (returning the reported pages) and record them."""
        with self.lock:
            number = self.collects_started
            self.collects_started += 1
        pages = set(do_collect())
        with self.lock:
            self._collected[number] = pages
            self.collects_finished += 1
        return pages

    def _misses(self, writes) -> list:
        return [(page, first, last) for page, first, last in writes
                if not any(page in self._collected.get(n, ()) for n in range(first, last + 1))]

    def missed(self) -> list:
        """Writes no collect in their window reported: must be empty. Call
        after a final collect that started once every writer had stopped."""
        with self.lock:
            return self._misses(self.writes)

    def check_settled(self) -> list:
        """Check every write whose window has closed, forget it and the collects
        no pending write needs; return the misses. Keeps a long run bounded."""
        with self.lock:
            done = self.collects_finished
            settled = [w for w in self.writes if w[2] < done]
            self.writes = [w for w in self.writes if w[2] >= done]
            misses = self._misses(settled)
            self.checked += len(settled)
            keep_from = min((w[1] for w in self.writes), default=done)
            for n in [n for n in self._collected if n < keep_from]:
                del self._collected[n]
            return misses
