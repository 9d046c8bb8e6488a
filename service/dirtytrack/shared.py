"""Shared memory written by several processes, tracked as one file.

A VMM's memfd-backed guest RAM is also written by a vhost-user back-end; a
database's shared buffers by every worker. userfaultfd tracks page tables, so
each writer's mapping must be tracked: this follows every process that maps
the file and reports the union of their writes by *file page*.

What no userfaultfd can see: writes through write(2)/pwrite(2) or fallocate
on the file, and writes by a process that maps it but cannot be attached (it
is listed in ``unattached`` with the reason). Such writers must be quiesced,
or the file resent whole, by whoever relies on the set.

    with dirtytrack.track_shared("/proc/1234/fd/7") as shared:
        d = shared.collect()      # SharedDirtySet: d.dirty is a DirtySet of file pages
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from dirtytrack._core import PAGE_SIZE, DirtySet
from dirtytrack.errors import DirtytrackError, InvalidRange, TrackerClosed
from dirtytrack.maps import Selection, file_identity, read_maps
from dirtytrack.process import ProcessTracker

__all__ = ["SharedDirtySet", "SharedTracker", "track_shared", "mappers_of"]


@dataclass
class SharedDirtySet:
    """File pages written since the previous collect, by any tracked mapper."""
    dirty: DirtySet
    pids: list[int] = field(default_factory=list)           # mappers tracked
    unattached: dict[int, str] = field(default_factory=dict)  # pid -> why not
    reasons: list[str] = field(default_factory=list)
    # A mapping's tracking was lost: its range is in `dirty` whole, but the
    # set is not an exact increment; resend what it covers.
    full_resync: bool = False

    def pages(self) -> list[int]:
        return self.dirty.pages()

    def ranges(self) -> list[tuple[int, int]]:
        """(first, stop) file page runs."""
        return self.dirty.ranges()


def mappers_of(identity: tuple[str, int]) -> list[int]:
    """Pids of the processes that map the file (any mapping, any perms)."""
    dev, inode = identity
    needle = f" {dev} {inode} ".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/maps", "rb") as f:
                if needle in f.read():
                    pids.append(int(entry))
        except OSError:
            continue            # exited, or a kernel thread, or not ours to read
    return sorted(pids)


class SharedTracker:
    """Tracks one file (memfd, shmem, /dev/shm, hugetlbfs...) in every process
    that maps it; new mappers are found at each collect, leavers dropped."""

    def __init__(self, path: str, *, pids: list[int] | None = None, follow: bool = True):
        try:
            self.identity = file_identity(path)
        except OSError as exc:
            raise InvalidRange(f"cannot identify {path}: {exc.strerror}", exc.errno) from None
        self.path = path
        self._follow = follow
        self._lock = threading.Lock()
        self._trackers: dict[int, ProcessTracker] = {}
        self._unattached: dict[int, str] = {}
        self._fresh: set[int] = set()
        self._closed = False
        self._last_npages = 0
        for pid in (pids if pids is not None else mappers_of(self.identity)):
            self._attach(pid, fresh=False)

    def _attach(self, pid: int, fresh: bool) -> None:
        selection = Selection(default=False, files=(self.identity,))
        try:
            tracker = ProcessTracker(pid, selection=selection)
        except DirtytrackError as exc:
            self._unattached[pid] = str(exc)
            return
        self._trackers[pid] = tracker
        self._unattached.pop(pid, None)
        if fresh:
            self._fresh.add(pid)

    @property
    def pids(self) -> list[int]:
        return sorted(self._trackers)

    def collect(self) -> SharedDirtySet:
        with self._lock:
            if self._closed:
                raise TrackerClosed(f"tracking of {self.path} was closed")
            reasons = []
            if self._follow:
                for pid in mappers_of(self.identity):
                    if pid not in self._trackers and pid not in self._unattached:
                        self._attach(pid, fresh=True)
                        reasons.append(f"process {pid} started mapping the file: its "
                                       "mappings are reported whole")
            pieces = []           # (first file page, stop file page, whole?, reason)
            for pid, tracker in list(self._trackers.items()):
                report = tracker.collect()
                for m in report.mappings:
                    if m.dirty is None:
                        continue
                    base = m.offset // PAGE_SIZE
                    whole = m.status in ("new", "lost") or pid in self._fresh
                    if whole:
                        pieces.append((base, base + (m.end - m.start) // PAGE_SIZE,
                                       m.reason if m.status == "lost" else None))
                    else:
                        pieces.extend((base + a, base + b, None) for a, b in m.dirty.runs())
                if report.exited:
                    tracker.close()
                    del self._trackers[pid]
                self._fresh.discard(pid)
            npages = max([self._file_npages(), self._last_npages] + [stop for _, stop, _ in pieces])
            self._last_npages = npages
            dirty = DirtySet(npages)
            lost = False
            for first, stop, why in pieces:
                dirty.add_range(first, stop)
                if why:
                    reasons.append(why)
                    lost = True
            return SharedDirtySet(dirty, self.pids, dict(self._unattached), reasons, lost)

    def _file_npages(self) -> int:
        try:
            size = os.stat(self.path).st_size
        except OSError:
            return 0
        return -(-size // PAGE_SIZE)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for tracker in self._trackers.values():
                tracker.close()
            self._trackers.clear()

    def __enter__(self) -> "SharedTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track_shared(path: str, *, pids: list[int] | None = None, follow: bool = True) -> SharedTracker:
    """Track the file at `path` (for a memfd: /proc/PID/fd/N) in every process mapping it."""
    return SharedTracker(path, pids=pids, follow=follow)
