"""Targets and their cursors: one ProcessTracker per target, one scan task each.

A target's scan task ticks at the fastest interval any subscriber asked for
(the daemon default when none did) and runs ProcessTracker.collect() in a
thread (the kernel scan releases the GIL). Each scan's report is folded into
every cursor of the target. Collect forces a scan that starts after the
request arrived; concurrent requests share one scan.

Ids embed a random per-start instance id, so nothing a previous daemon
handed out can be mistaken for ours.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

from dirtytrack._core import PAGE_SIZE
from dirtytrack.daemon.cursors import INTERNAL_ERROR, CURSOR_STARTED_FULL, Cursor
from dirtytrack.daemon.errors import BadRequest, NotFound, Precondition
from dirtytrack.daemon.stats import ScanStats
from dirtytrack.maps import Selection
from dirtytrack.process import MappingReport, ProcessTracker

log = logging.getLogger("dirtytrack.daemon")


def _ids(prefix: str, instance: str):
    n = 0
    while True:
        n += 1
        yield f"{prefix}-{instance}-{n}"


class Target:
    def __init__(self, registry: "Registry", target_id: str, tracker: ProcessTracker,
                 selection: Selection):
        self.registry = registry
        self.id = target_id
        self.tracker = tracker
        self.pid = tracker.pid
        self.selection = selection
        self.cursors: dict[str, Cursor] = {}
        self.state = "tracking"
        self.error = ""
        self.scans = 0
        self.last_scan_us = 0
        self.stats = ScanStats(self.pid)                 # what scans produced (metrics)
        self.events = collections.deque(maxlen=64)      # (MappingReport, unix_ns)
        self.intervals: dict[object, float] = {}
        self._lock = asyncio.Lock()
        self._waiters: list[asyncio.Future] = []
        self._scans: set[asyncio.Task] = set()        # scans in flight (kept referenced)
        self._kick = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._reader = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.tracker.fileno(), self._kick.set)    # pidfd: readable at exit
        self._reader = True
        self._task = loop.create_task(self._run(), name=f"scan {self.id}")

    # -- scan cadence -----------------------------------------------------------
    @property
    def interval(self) -> float:
        cfg = self.registry.config
        return min(self.intervals.values(), default=cfg.default_interval_ms / 1000)

    def want_interval(self, token: object, seconds: float) -> None:
        self.intervals[token] = seconds
        self._kick.set()

    def drop_interval(self, token: object) -> None:
        self.intervals.pop(token, None)

    async def _run(self) -> None:
        while self.state == "tracking":
            try:
                await asyncio.wait_for(self._kick.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._kick.clear()
            try:
                await self.scan()
            except asyncio.CancelledError:
                raise
            except Exception:             # noqa: BLE001 - keep scanning; each failure is reported
                log.exception("%s: scan loop error", self.id)

    async def scan(self) -> None:
        """Return after a scan that started after this call began.

        The scan runs in a task of its own and the caller only waits for it:
        a caller cancelled mid-scan (a Collect's deadline, a disconnect) must
        never stop the report from reaching the cursors, since the kernel has
        already reset the pages it found.
        """
        loop = asyncio.get_running_loop()
        me = loop.create_future()
        self._waiters.append(me)
        task = loop.create_task(self._scan_when_free(me), name=f"scan {self.id}")
        self._scans.add(task)
        task.add_done_callback(self._scans.discard)
        await asyncio.shield(me)

    async def _scan_when_free(self, me: asyncio.Future) -> None:
        async with self._lock:
            if not me.done():
                await self._scan_locked()

    async def _scan_locked(self) -> None:
        waiters, self._waiters = self._waiters, []
        try:
            if self.state != "tracking":
                return
            mono, unix = time.monotonic_ns(), time.time_ns()
            loop = asyncio.get_running_loop()
            try:
                report = await loop.run_in_executor(self.registry.executor, self.tracker.collect)
            except Exception as exc:       # noqa: BLE001 - every failure must reach clients
                self.stats.record_failure((time.monotonic_ns() - mono) / 1e9)
                self._failed_scan(exc)
                return
            self.scans += 1
            self.last_scan_us = (time.monotonic_ns() - mono) // 1000
            self.stats.record_scan(report, mono, (time.monotonic_ns() - mono) / 1e9)
            for m in report.mappings:
                if m.status in ("lost", "removed"):
                    self.events.append((m, unix))
            for cursor in self.cursors.values():
                try:
                    cursor.pending.add_report(report, mono, unix)
                except Exception as exc:   # noqa: BLE001 - never a smaller set
                    log.exception("%s: folding a scan into %s failed", self.id, cursor.id)
                    cursor.pending.add_everything(
                        self.tracked_mappings(), INTERNAL_ERROR,
                        f"internal error folding a scan in ({type(exc).__name__}: {exc}): "
                        "every tracked page is included")
                cursor.wake.set()
            if report.exited:
                self._end("exited")
            elif self.tracker.ended:
                self.error = "; ".join(report.reasons)
                self._end("failed")
        finally:
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    def _failed_scan(self, exc: Exception) -> None:
        """The scan raised: what it reset is unknown, so every cursor gets everything."""
        reason = (f"internal error while scanning process {self.pid} ({type(exc).__name__}: "
                  f"{exc}): every tracked page is included")
        log.error("%s: %s", self.id, reason)
        everything = self.tracked_mappings()
        for cursor in self.cursors.values():
            cursor.pending.add_everything(everything, INTERNAL_ERROR, reason)
            cursor.wake.set()
        if self.tracker.closed:
            self.error = reason
            self._end("failed")

    def tracked_mappings(self) -> list[MappingReport]:
        try:
            rows = self.tracker.mappings()
        except Exception:             # noqa: BLE001
            return []
        return [MappingReport(r["mapping_id"], r["start"], r["end"], r["name"], r["kind"],
                              r["offset"], r["dev"], r["inode"], "lost", None) for r in rows]

    def _end(self, state: str) -> None:
        self.state = state
        self._stop_reader()
        self._kick.set()

    def _stop_reader(self) -> None:
        if self._reader:
            self._reader = False
            try:
                asyncio.get_running_loop().remove_reader(self.tracker.fileno())
            except (RuntimeError, ValueError, OSError):
                pass

    # -- cursors ---------------------------------------------------------------------
    def open_cursor(self, start_full: bool, label: str) -> Cursor:
        cursor = Cursor(next(self.registry._cursor_ids), self, label)
        if start_full:
            cursor.pending.add_everything(self.tracked_mappings(), CURSOR_STARTED_FULL,
                                          "cursor opened with start_full: every tracked page")
            for m in cursor.pending.mappings.values():
                m.status = "new"
        self.cursors[cursor.id] = cursor
        self.registry.cursors[cursor.id] = cursor
        return cursor

    async def close(self, reason: str) -> None:
        self._end(self.state if self.state != "tracking" else "detached")
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):   # noqa: BLE001
                pass
        async with self._lock:
            await asyncio.get_running_loop().run_in_executor(self.registry.executor,
                                                             self.tracker.close)
        for cursor in list(self.cursors.values()):
            self.registry.forget_cursor(cursor, reason)


class Registry:
    def __init__(self, config):
        self.config = config
        self.instance = secrets.token_hex(6)
        self.started_unix = time.time()
        self.targets: dict[str, Target] = {}
        self.cursors: dict[str, Cursor] = {}
        self.tombstones: dict[str, str] = {}          # closed cursor/target id -> why
        self.executor = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                                           thread_name_prefix="dirtytrack-scan")
        self._target_ids = _ids("tgt", self.instance)
        self._cursor_ids = _ids("cur", self.instance)
        self.stopping = False

    # -- lookups ---------------------------------------------------------------------
    def _foreign(self, kind: str, ident: str) -> None:
        parts = ident.split("-")
        if len(parts) == 3 and parts[1] != self.instance and len(parts[1]) == 12:
            raise Precondition("DAEMON_RESTARTED", (
                f"{kind} {ident} belongs to an earlier run of the daemon (instance {parts[1]}; "
                f"this one is {self.instance}, started {time.ctime(self.started_unix)}). "
                "Tracking was interrupted, so what was written meanwhile is unknown: attach "
                "again if needed, open a new cursor and resend everything (full resync)"),
                previous_instance=parts[1], instance=self.instance)

    def target(self, target_id: str) -> Target:
        if not target_id:
            raise BadRequest("target_id", "target_id is empty: pass an id from Attach or "
                             "ListTargets (`dirtytrack targets`)")
        t = self.targets.get(target_id)
        if t is None:
            self._foreign("target", target_id)
            why = self.tombstones.get(target_id, "no such target")
            raise NotFound("target", target_id, f"target {target_id}: {why}. List targets "
                           "with ListTargets (`dirtytrack targets`)")
        return t

    def cursor(self, cursor_id: str) -> Cursor:
        if not cursor_id:
            raise BadRequest("cursor_id", "cursor_id is empty: open one with OpenCursor")
        c = self.cursors.get(cursor_id)
        if c is None:
            self._foreign("cursor", cursor_id)
            why = self.tombstones.get(cursor_id, "no such cursor")
            raise NotFound("cursor", cursor_id, f"cursor {cursor_id}: {why}. What it still "
                           "owed is gone: open a new cursor with OpenCursor (start_full) and "
                           "resend everything")
        c.last_used = time.monotonic()
        return c

    def forget_cursor(self, cursor: Cursor, reason: str) -> None:
        cursor.close(reason)
        cursor.target.cursors.pop(cursor.id, None)
        self.cursors.pop(cursor.id, None)
        self.tombstones[cursor.id] = reason
        if len(self.tombstones) > 100_000:             # bounded: oldest go first
            for key in list(self.tombstones)[:50_000]:
                del self.tombstones[key]

    # -- targets --------------------------------------------------------------------
    async def attach(self, pid: int, selection: Selection, allow_seccomp: bool):
        for t in self.targets.values():
            if t.pid == pid and t.state == "tracking":
                if t.selection == selection:
                    return t, True
                raise Precondition("ALREADY_ATTACHED", (
                    f"process {pid} is already tracked as {t.id} with another selection; "
                    f"detach it first (`dirtytrack detach {t.id}`)"), target_id=t.id)
        loop = asyncio.get_running_loop()
        tracker = await loop.run_in_executor(
            self.executor, lambda: ProcessTracker(pid, selection=selection,
                                                  allow_seccomp=allow_seccomp))
        target = Target(self, next(self._target_ids), tracker, selection)
        target.stats.set_tracked(target.tracked_mappings())
        self.targets[target.id] = target
        target.start()
        log.info("attached %s: pid %d, %d mappings", target.id, pid, len(tracker.mappings()))
        return target, False

    async def detach(self, target: Target, reason: str) -> None:
        self.targets.pop(target.id, None)
        self.tombstones[target.id] = reason
        await target.close(f"its target {target.id} was detached ({reason})")

    def expire_idle(self) -> None:
        limit = self.config.cursor_idle_timeout_s
        now = time.monotonic()
        for cursor in list(self.cursors.values()):
            if cursor.consumer is None and now - cursor.last_used > limit:
                self.forget_cursor(cursor, f"expired after {limit:g} s without requests")

    async def close(self) -> None:
        self.stopping = True
        for cursor in self.cursors.values():
            cursor.wake.set()
        for target in list(self.targets.values()):
            await self.detach(target, "the daemon shut down")
        self.executor.shutdown(wait=True)

    @staticmethod
    def page_size() -> int:
        return PAGE_SIZE
