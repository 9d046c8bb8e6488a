"""Track a whole running process by pid: attach, follow its address space, collect.

    with dirtytrack.attach(pid) as target:
        report = target.collect()        # a ProcessDirtySet
        report.ranges()                  # dirty (start, end) virtual address ranges
        report.full_resync               # True: something could not be proven complete

The address space changes under us. Each collect first reconciles the
tracked regions with /proc/PID/maps: a mapping that appeared (or the part a
mapping grew by) is registered and reported wholly dirty, status "new"; a
region no longer wholly mapped is reported "removed", and what is left of it
comes back as "new". A region whose registration was lost between two collects
(replaced in place, moved by mremap) is reported whole as "lost". The target
exiting ends tracking with a final report (exited=True); exec() starts a new
address space, reported as a full resync.
"""
from __future__ import annotations

import errno
import os
import select
import threading
from dataclasses import dataclass, field

from dirtytrack._core import PAGE_SIZE, DirtySet, Region, Tracker
from dirtytrack.errors import DirtytrackError, InvalidRange, ProcessGone, TrackerClosed
from dirtytrack.maps import VMA, Selection, first_gap, parse_maps, read_maps_bytes

__all__ = ["MappingReport", "ProcessDirtySet", "ProcessTracker", "attach",
           "EXITED", "EXEC", "LOST", "ERROR"]

PF_KTHREAD = 0x00200000      # include/linux/sched.h


@dataclass(frozen=True)
class MappingReport:
    """What one tracked region did since the previous collect.

    status: "tracking" (dirty holds the pages written), "new" (just mapped or
    grown into: every page counts as dirty), "lost" (tracking could not be
    proven: every page, reason says why), "removed" (no longer mapped: there is
    nothing to copy; dirty is None).
    """
    mapping_id: int
    start: int
    end: int
    name: str
    kind: str
    offset: int
    dev: str
    inode: int
    status: str
    dirty: DirtySet | None
    reason: str | None = None

    @property
    def count(self) -> int:
        return self.dirty.count if self.dirty is not None else 0

    def ranges(self) -> list[tuple[int, int]]:
        """Dirty pages of this mapping as (start, end) virtual addresses."""
        if self.dirty is None:
            return []
        return [(self.start + first * PAGE_SIZE, self.start + stop * PAGE_SIZE)
                for first, stop in self.dirty.runs()]


# Why a set is not an exact increment (ProcessDirtySet.events codes).
EXITED = "exited"          # the target exited: tracking ended
EXEC = "exec"              # the target called exec(): a new address space
LOST = "lost"              # a mapping's registration was lost; it is reported whole
ERROR = "error"            # an internal failure; every tracked mapping is reported whole


@dataclass
class ProcessDirtySet:
    """Everything written in a process since the previous collect, by mapping."""
    pid: int
    mappings: list[MappingReport] = field(default_factory=list)
    exited: bool = False
    events: list[tuple[str, str]] = field(default_factory=list)   # (code, message)

    @property
    def reasons(self) -> list[str]:
        return [message for _, message in self.events]

    @property
    def count(self) -> int:
        return sum(m.count for m in self.mappings)

    @property
    def full_resync(self) -> bool:
        """The set cannot be trusted as an increment: resend everything."""
        return self.exited or bool(self.events) or any(m.status == "lost" for m in self.mappings)

    def ranges(self) -> list[tuple[int, int]]:
        """All dirty (start, end) address ranges, mapping by mapping."""
        return [r for m in self.mappings for r in m.ranges()]

    def by_mapping(self) -> dict[int, list[tuple[int, int]]]:
        return {m.mapping_id: m.ranges() for m in self.mappings if m.dirty is not None}

    @property
    def removed(self) -> list[MappingReport]:
        return [m for m in self.mappings if m.status == "removed"]

    def pages(self) -> set[int]:
        """Every dirty page as its virtual address (convenient for small sets)."""
        return {addr for lo, hi in self.ranges() for addr in range(lo, hi, PAGE_SIZE)}


@dataclass
class _Tracked:
    mapping_id: int
    region: Region
    vma: VMA
    kind: str
    fresh: bool = True       # not reported yet: the next report says "new"


def _stat_flags(pid: int) -> tuple[str, int]:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[6])          # state, flags (fields 3 and 9 of stat)


class ProcessTracker:
    """Write tracking of another process (or this one) by pid.

    Without `uffd`, a userfaultfd is injected into the target with ptrace
    (root or CAP_SYS_PTRACE); with `uffd` (received with
    dirtytrack.handover.receive_userfaultfd) the process cooperated.
    """

    def __init__(self, pid: int, *, uffd: int | None = None,
                 selection: Selection | None = None, allow_seccomp: bool = False):
        self.pid = int(pid)
        self.selection = selection or Selection()
        self._allow_seccomp = allow_seccomp
        self._cooperative = uffd is not None
        self._lock = threading.Lock()
        self._tracked: list[_Tracked] = []
        self._skipped: list[tuple[VMA, str]] = []
        self._next_id = 1
        self._final: ProcessDirtySet | None = None
        self._tracker: Tracker | None = None
        self._maps_fd = -1
        self._parsed: tuple[bytes, list[VMA], list, list] | None = None   # see _read_maps
        self.attach_stopped_ns = 0
        if self.pid <= 0:
            raise InvalidRange(f"{pid} is not a process id")
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            raise ProcessGone(f"no process {self.pid}: check the pid (ps -p {self.pid})",
                              errno.ESRCH) from None
        self._unowned_uffd = uffd      # ours to close until a Tracker takes it
        try:
            self._refuse_unsuitable()
            self._start(uffd)
            self._reconcile(initial=True)
        except BaseException:
            self._release()
            if self._unowned_uffd is not None:
                os.close(self._unowned_uffd)
            raise

    # -- setup ----------------------------------------------------------------
    def _refuse_unsuitable(self) -> None:
        try:
            state, flags = _stat_flags(self.pid)
        except FileNotFoundError:
            raise ProcessGone(f"process {self.pid} exited", errno.ESRCH) from None
        if flags & PF_KTHREAD:
            raise InvalidRange(f"process {self.pid} is a kernel thread: it has no user "
                               "memory to track")
        if state in ("Z", "X"):
            raise ProcessGone(f"process {self.pid} is a zombie (it exited; its parent has "
                              "not reaped it): there is no memory left to track", errno.ESRCH)

    def _start(self, uffd: int | None) -> None:
        """Get a userfaultfd of the target, open its pagemap and maps while it is
        pinned by our pidfd, then check it is still the same live process."""
        if uffd is None and self.pid != os.getpid():
            from dirtytrack._core import inject_userfaultfd
            injected = inject_userfaultfd(self.pid, allow_seccomp=self._allow_seccomp)
            uffd = injected.fd
            self.attach_stopped_ns = injected.stopped_ns
        if uffd is None:
            self._tracker = Tracker()
        else:
            self._unowned_uffd = None      # Tracker owns it now, even if it raises
            self._tracker = Tracker(self.pid, uffd=uffd)
        maps_fd = os.open(f"/proc/{self.pid}/maps", os.O_RDONLY | os.O_CLOEXEC)
        self._maps_fd = maps_fd
        if self._exited():
            raise ProcessGone(f"process {self.pid} exited while being attached", errno.ESRCH)

    # -- queries --------------------------------------------------------------
    def _exited(self, timeout: float = 0) -> bool:
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))

    @property
    def exited(self) -> bool:
        return self._final is not None and self._final.exited or self._exited()

    def fileno(self) -> int:
        """The pidfd: readable once the target exits (for event loops)."""
        return self._pidfd

    def mappings(self) -> list[dict]:
        """The tracked regions: id, start, end, name, kind, state."""
        with self._lock:
            return [dict(mapping_id=t.mapping_id, start=t.region.start, end=t.region.end,
                         name=t.vma.name, kind=t.kind, state=t.region.state,
                         offset=t.vma.offset + (t.region.start - t.vma.start),
                         dev=t.vma.dev, inode=t.vma.inode)
                    for t in self._tracked]

    def skipped(self) -> list[dict]:
        """Mappings not tracked, each with the reason."""
        with self._lock:
            return [dict(start=v.start, end=v.end, name=v.name, perms=v.perms, reason=why)
                    for v, why in self._skipped]

    @property
    def tracked_bytes(self) -> int:
        with self._lock:
            return sum(t.region.length for t in self._tracked)

    # -- following the address space -------------------------------------------
    def _add(self, start: int, end: int, vma: VMA, kind: str, initial: bool) -> None:
        try:
            region = self._tracker.add_range(start, end - start)
        except DirtytrackError as exc:      # busy (another userfaultfd), unregistrable, gone
            self._skipped.append((vma, f"cannot be tracked: {exc.message}"))
            return
        # Regions found at attach are the baseline (like track(): writes from
        # now on); those that appear later were never seen, so they are new.
        self._tracked.append(_Tracked(self._next_id, region, vma, kind, fresh=not initial))
        self._next_id += 1

    def _read_maps(self) -> tuple[list[VMA], list, list]:
        """(vmas, chosen, skipped) of the current /proc/PID/maps. The file is
        read every time; parsing and selecting (pure functions of its bytes,
        ~0.5 ms in Python) are redone only when the bytes changed."""
        text = read_maps_bytes(self._maps_fd)
        if self._parsed is None or self._parsed[0] != text:
            vmas = parse_maps(text.decode("utf-8", "surrogateescape"))
            self._parsed = (text, vmas, *self.selection.pick(vmas))
        _, vmas, chosen, skipped = self._parsed
        return vmas, chosen, list(skipped)        # _add appends to the skipped list

    def _reconcile(self, initial: bool = False) -> list[MappingReport]:
        """Bring the tracked regions in line with the current mappings; returns
        the reports of regions that went away."""
        vmas, chosen, skipped = self._read_maps()
        if not vmas:
            raise _AddressSpaceGone()
        gone: list[MappingReport] = []
        # A region stays while every byte of it is still mapped (splits by
        # mprotect are fine); otherwise it is reported removed, and what is
        # still mapped of it comes back below as new.
        kept = []
        for t in self._tracked:
            if first_gap(vmas, t.region.start, t.region.end) is None:
                kept.append(t)
                continue
            gone.append(self._report(t, "removed", None,
                                     "no longer wholly mapped (munmap, mremap or exit)"))
            if self._tracker is not None and not self._tracker.closed:
                self._tracker.remove_range(t.region)
        self._tracked = kept
        self._skipped = skipped
        covered = sorted((t.region.start, t.region.end) for t in self._tracked)
        for start, end, vma in chosen:
            for lo, hi in _uncovered(covered, start, end):
                kind = vma.kind()[0] or "selected"
                self._add(lo, hi, vma, kind, initial)
        return gone

    def _report(self, t: _Tracked, status: str, dirty: DirtySet | None,
                reason: str | None = None) -> MappingReport:
        return MappingReport(t.mapping_id, t.region.start, t.region.end, t.vma.name, t.kind,
                             t.vma.offset + (t.region.start - t.vma.start), t.vma.dev,
                             t.vma.inode, status, dirty, reason)

    # -- collecting -------------------------------------------------------------
    def collect(self) -> ProcessDirtySet:
        """Pages written since the previous collect, mapping by mapping."""
        with self._lock:
            if self._final is not None:
                return self._final
            if self._tracker is None or self._tracker.closed:
                raise TrackerClosed(f"tracking of process {self.pid} was closed")
            if self._exited():
                return self._finish_exited()
            report = ProcessDirtySet(self.pid)
            try:
                report.mappings += self._reconcile()
            except _AddressSpaceGone:
                return self._address_space_gone()
            except (OSError, DirtytrackError) as exc:
                # Could not follow the address space this time: scan what we
                # track anyway (nothing already reset may be dropped) and say so.
                if self._exited():
                    return self._finish_exited()
                report.events.append((ERROR, f"could not read process {self.pid}'s mappings: "
                                             f"{exc}; new mappings are picked up next time"))
            for t in self._tracked:
                try:
                    dirty = self._tracker.collect(t.region)
                except Exception as exc:  # noqa: BLE001 - a failure must not shrink the set
                    dirty = DirtySet(t.region.npages, lost_reason=f"internal error: {exc!r}")
                if t.fresh:
                    dirty.add_range(0, dirty.npages)
                    report.mappings.append(self._report(t, "new", dirty, "newly tracked mapping"))
                    t.fresh = False
                elif dirty.lost:
                    report.mappings.append(self._report(t, "lost", dirty, dirty.lost_reason))
                    report.events.append((LOST, f"{t.vma.name or '[anon]'}: {dirty.lost_reason}"))
                else:
                    report.mappings.append(self._report(t, "tracking", dirty))
            if self._exited():
                # It exited mid-collect: what we read may be partial.
                return self._finish_exited()
            return report

    def _finish_exited(self) -> ProcessDirtySet:
        final = ProcessDirtySet(self.pid, exited=True,
                                events=[(EXITED, f"process {self.pid} exited: tracking ended")])
        final.mappings = [self._report(t, "removed", None, "the process exited")
                          for t in self._tracked]
        self._tracked = []
        self._final = final
        self._release(keep_pidfd=True)
        return final

    def _address_space_gone(self) -> ProcessDirtySet:
        """Our maps fd reads empty: the old address space is gone. Either the
        process is exiting, or it called exec() and has a new one."""
        if self._exited(timeout=0.2):
            return self._finish_exited()
        old = [self._report(t, "removed", None, "the process called exec()")
               for t in self._tracked]
        self._tracked = []
        self._release(keep_pidfd=True)
        reason = f"process {self.pid} called exec(): a new address space, resend everything"
        if self._cooperative:
            return self._end_tracking(old, EXEC, reason + "; its handed-over userfaultfd died "
                                      "with the old one: have the new program hand a new one over")
        try:
            self._start(None)
            self._reconcile(initial=True)
        except Exception as exc:  # noqa: BLE001 - injection refused, process gone, ...
            self._release(keep_pidfd=True)
            return self._end_tracking(old, EXEC, f"{reason}; attaching to the new program "
                                      f"failed ({exc}): tracking ended")
        report = ProcessDirtySet(self.pid, old, events=[(EXEC, reason)])
        for t in self._tracked:
            dirty = DirtySet(t.region.npages)
            dirty.add_range(0, dirty.npages)
            t.fresh = False
            report.mappings.append(self._report(t, "new", dirty, "mapped by the new program"))
        return report

    def _end_tracking(self, old: list[MappingReport], code: str, reason: str) -> ProcessDirtySet:
        """Tracking cannot go on (the process lives): a final full-resync report."""
        final = ProcessDirtySet(self.pid, old, exited=False, events=[(code, reason)])
        self._tracked = []
        self._final = final
        return final

    @property
    def ended(self) -> bool:
        """Tracking is over (exit, or an exec we could not follow): collect()
        keeps returning the final report."""
        return self._final is not None

    # -- life -------------------------------------------------------------------
    def _release(self, keep_pidfd: bool = False) -> None:
        if self._tracker is not None:
            self._tracker.close()
        if self._maps_fd >= 0:
            os.close(self._maps_fd)
            self._maps_fd = -1
        if not keep_pidfd and getattr(self, "_pidfd", -1) >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def close(self) -> None:
        """Stop tracking (unregisters everything; the target runs on untouched)."""
        with self._lock:
            if getattr(self, "_pidfd", -1) < 0:
                return
            self._release()

    @property
    def closed(self) -> bool:
        return self._pidfd < 0

    def __enter__(self) -> "ProcessTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ProcessTracker pid={self.pid} {len(self._tracked)} regions>"


class _AddressSpaceGone(Exception):
    pass


def _uncovered(covered: list[tuple[int, int]], start: int, end: int):
    """Parts of [start, end) outside the sorted, disjoint `covered` ranges."""
    pos = start
    for lo, hi in covered:
        if hi <= pos:
            continue
        if lo >= end:
            break
        if lo > pos:
            yield pos, lo
        pos = max(pos, hi)
    if pos < end:
        yield pos, end


def attach(pid: int, *, uffd: int | None = None, names=(), ranges=(), default: bool = True,
           allow_seccomp: bool = False) -> ProcessTracker:
    """Track process `pid`. See ProcessTracker and dirtytrack.maps.Selection."""
    selection = Selection(default=default, names=tuple(names),
                          ranges=tuple((int(lo), int(hi)) for lo, hi in ranges))
    return ProcessTracker(pid, uffd=uffd, selection=selection, allow_seccomp=allow_seccomp)
