"""Per-client cursors: what each client is owed, kept as bitmaps.

One kernel scan per target feeds every cursor of the target (the kernel's
write-protect reset is global), so each cursor keeps its own state:

  pending   pages written since the last set this cursor delivered, per
            mapping id (DirtySets, OR-merged scan after scan), plus mappings
            removed and full-resync reasons;
  unacked   the sets delivered and not yet acknowledged, (seq, SetState),
            kept so a client that lost a set or a stream can resume.

Harvest-then-acknowledge: rewind(k) acknowledges every set <= k and merges
every set > k back into pending, oldest first, so the next set is k + 1 and
holds all of them: sequence numbers stay gapless and nothing is ever dropped
unacknowledged. A subscriber stops being sent sets when `window` are
unacknowledged; new scans keep merging into pending, so a stalled client
costs at most (window + 1) bitmaps, never a growing queue.

A scan's DirtySets are shared by every cursor until one has to merge into
its copy (copy on write): a fan-out to 100 cursors costs no copies on the
ticks where cursors keep up.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from dirtytrack._core import PAGE_SIZE, DirtySet
from dirtytrack.daemon.errors import BadRequest, Precondition
from dirtytrack.process import ERROR, EXEC, EXITED, LOST

# Resync codes (dirtytrack.v1.ResyncCode).
TRACKING_LOST, TARGET_EXEC, TARGET_EXITED, INTERNAL_ERROR, CURSOR_STARTED_FULL = 1, 2, 3, 4, 5
_RANK = {"tracking": 0, "new": 1, "lost": 2}


@dataclass
class Owed:
    """Pages of one mapping owed to a cursor."""
    meta: object                 # the MappingReport it was first seen in (range, name...)
    status: str                  # "tracking", "new" or "lost"
    dirty: DirtySet
    reason: str | None
    owned: bool = False          # False: `dirty` is shared with other cursors

    def merge(self, other: "Owed") -> None:
        if not self.owned:
            self.dirty = self.dirty.copy()
            self.owned = True
        self.dirty |= other.dirty
        if _RANK[other.status] > _RANK[self.status]:
            self.status = other.status
        if other.reason and other.reason != self.reason:
            self.reason = f"{self.reason}; {other.reason}" if self.reason else other.reason
        self.meta = other.meta


@dataclass
class SetState:
    """One set: delivered (kept until acked) or pending (being built)."""
    mappings: dict = field(default_factory=dict)      # mapping_id -> Owed
    removed: dict = field(default_factory=dict)       # mapping_id -> (meta, reason)
    resync: list = field(default_factory=list)        # [(code, message)]
    exited: bool = False
    scans: int = 0
    scan_mono_ns: int = 0
    scan_unix_ns: int = 0

    @property
    def full_resync(self) -> bool:
        return bool(self.resync)

    @property
    def count(self) -> int:
        return sum(o.dirty.count for o in self.mappings.values())

    @property
    def empty(self) -> bool:
        return not self.removed and not self.resync and not self.exited and not any(
            o.dirty for o in self.mappings.values())

    def held_bytes(self) -> int:
        return sum((o.dirty.npages + 7) // 8 for o in self.mappings.values() if o.owned)

    def _resync(self, code: int, message: str) -> None:
        if (code, message) not in self.resync:
            self.resync.append((code, message))

    def _put(self, mapping_id: int, owed: Owed) -> None:
        have = self.mappings.get(mapping_id)
        if have is None:
            self.mappings[mapping_id] = owed
        else:
            have.merge(owed)

    def add_report(self, report, mono_ns: int, unix_ns: int) -> None:
        """Fold one scan (a ProcessDirtySet) in."""
        for m in report.mappings:
            if m.status == "removed":
                self.mappings.pop(m.mapping_id, None)
                self.removed[m.mapping_id] = (m, m.reason)
            else:
                self._put(m.mapping_id, Owed(m, m.status, m.dirty, m.reason))
        codes = {EXITED: TARGET_EXITED, EXEC: TARGET_EXEC, LOST: TRACKING_LOST,
                 ERROR: INTERNAL_ERROR}
        for event, message in report.events:
            self._resync(codes[event], message)
        self.exited = self.exited or report.exited
        self._scanned(1, mono_ns, unix_ns)

    def _scanned(self, scans: int, mono_ns: int, unix_ns: int) -> None:
        self.scans += scans
        if mono_ns > self.scan_mono_ns:
            self.scan_mono_ns, self.scan_unix_ns = mono_ns, unix_ns

    def add_everything(self, mappings, code: int, reason: str) -> None:
        """Every page of every tracked mapping (MappingReport-like objects)."""
        for m in mappings:
            npages = (m.end - m.start) // PAGE_SIZE
            d = DirtySet(npages)
            d.add_range(0, npages)
            self._put(m.mapping_id, Owed(m, "lost", d, reason, owned=True))
        self._resync(code, reason)

    def absorb(self, newer: "SetState") -> None:
        """Fold a newer set into this one (this one first, then `newer`)."""
        for mapping_id, gone in newer.removed.items():
            self.mappings.pop(mapping_id, None)
            self.removed[mapping_id] = gone
        for mapping_id, owed in newer.mappings.items():
            self._put(mapping_id, owed)
        for code, message in newer.resync:
            self._resync(code, message)
        self.exited = self.exited or newer.exited
        self._scanned(newer.scans, newer.scan_mono_ns, newer.scan_unix_ns)


class Cursor:
    """A client's position in one target's stream of dirty sets."""

    def __init__(self, cursor_id: str, target, label: str = ""):
        self.id = cursor_id
        self.target = target
        self.label = label
        self.pending = SetState()
        self.unacked: list[tuple[int, SetState]] = []
        self.delivered = 0
        self.acked = 0
        self.consumer: object | None = None      # token of the stream reading it
        self.closed_reason: str | None = None
        self.wake = asyncio.Event()
        self.last_used = time.monotonic()

    # -- sequence bookkeeping -------------------------------------------------
    def _check_seq(self, seq: int, field_name: str) -> None:
        if seq > self.delivered:
            raise BadRequest(field_name, (
                f"{field_name}={seq} is ahead of cursor {self.id}: it has delivered sets up to "
                f"{self.delivered}. Pass the newest seq you received (0 before the first set)"))
        if seq < self.acked:
            raise Precondition("ALREADY_ACKNOWLEDGED", (
                f"{field_name}={seq} is behind cursor {self.id}: sets up to {self.acked} were "
                f"acknowledged and dropped. Resume after {self.acked} or later; if you did lose "
                "sets you acknowledged, open a new cursor and resend everything"),
                acked_seq=self.acked)

    def ack(self, seq: int) -> None:
        self._check_seq(seq, "seq")
        self.acked = max(self.acked, seq)
        while self.unacked and self.unacked[0][0] <= seq:
            self.unacked.pop(0)
        self.last_used = time.monotonic()
        self.wake.set()

    def rewind(self, after: int) -> None:
        """Acknowledge sets <= after; owe every later one again as set after + 1."""
        self._check_seq(after, "after_seq")
        self.ack(after)
        if self.unacked:
            merged = SetState()
            for _, state in self.unacked:
                merged.absorb(state)
            merged.absorb(self.pending)
            self.pending = merged
            self.unacked = []
            self.delivered = after

    def deliver(self) -> tuple[int, SetState]:
        """Hand out everything pending as the next set (kept until acknowledged)."""
        state, self.pending = self.pending, SetState()
        self.delivered += 1
        self.unacked.append((self.delivered, state))
        self.last_used = time.monotonic()
        return self.delivered, state

    # -- consumers ----------------------------------------------------------------
    def take_over(self) -> object:
        """A new reader: the previous stream (if any) ends with ABORTED."""
        token = object()
        self.consumer = token
        self.wake.set()
        return token

    def release(self, token: object) -> None:
        if self.consumer is token:
            self.consumer = None
            self.last_used = time.monotonic()    # in use until now: idle from here on

    def held_bytes(self) -> int:
        return self.pending.held_bytes() + sum(s.held_bytes() for _, s in self.unacked)

    def close(self, reason: str) -> None:
        self.closed_reason = reason
        self.pending = SetState()
        self.unacked = []
        self.wake.set()
