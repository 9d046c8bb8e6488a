"""A small synchronous client of the daemon (CLI, tests, bench).

    with Client("unix:/run/dirtytrack/dirtytrack.sock") as c:
        target = c.attach(pid).target
        cursor = c.open_cursor(target.target_id)
        s = c.collect(cursor)              # a DirtySetView; next call acknowledges it
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import grpc

from dirtytrack.daemon.encoding import piece_runs
from dirtytrack.v1 import dirtytrack_pb2 as pb
from dirtytrack.v1 import dirtytrack_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "unix:/run/dirtytrack/dirtytrack.sock"


def address_from(socket: str | None = None, address: str | None = None) -> str:
    if address:
        return address
    if socket:
        return f"unix:{os.path.abspath(socket)}"
    return os.environ.get("DIRTYTRACK_ADDRESS", DEFAULT_ADDRESS)


@dataclass
class DirtySetView:
    """One whole set, its chunks joined."""
    cursor_id: str
    seq: int
    page_size: int
    full_resync: bool
    resync: list
    exited: bool
    scans: int
    scan_mono_ns: int
    removed: list = field(default_factory=list)
    pieces: list = field(default_factory=list)       # MappingDirty
    chunks: int = 0

    @property
    def count(self) -> int:
        return sum(p.dirty_pages for p in self.pieces)

    def ranges(self) -> list[tuple[int, int]]:
        """Dirty (start, end) virtual address ranges."""
        return [(p.start + lo * self.page_size, p.start + hi * self.page_size)
                for p in self.pieces for lo, hi in piece_runs(p)]

    def pages(self) -> set[int]:
        return {a for lo, hi in self.ranges() for a in range(lo, hi, self.page_size)}


def join_chunks(chunks) -> DirtySetView:
    """Chunks of one set, in order, into a DirtySetView (checks they belong together)."""
    view = None
    for chunk in chunks:
        if view is None:
            if chunk.chunk_index != 0:
                raise ValueError(f"set {chunk.seq} starts at chunk {chunk.chunk_index}")
            view = DirtySetView(chunk.cursor_id, chunk.seq, chunk.page_size, chunk.full_resync,
                                [(r.code, r.message) for r in chunk.resync], chunk.target_exited,
                                chunk.scans, chunk.scan_started_monotonic_ns,
                                list(chunk.removed))
        elif chunk.seq != view.seq or chunk.chunk_index != view.chunks:
            raise ValueError(f"chunk {chunk.seq}/{chunk.chunk_index} out of order")
        else:
            view.resync.extend((r.code, r.message) for r in chunk.resync)
            view.removed.extend(chunk.removed)
        view.pieces.extend(chunk.mappings)
        view.chunks += 1
        if chunk.last_chunk:
            return view
    raise ValueError("the set ended before its last chunk")


def sets(responses):
    """DirtySetViews from a Subscribe stream."""
    pending = []
    for response in responses:
        pending.append(response.chunk)
        if response.chunk.last_chunk:
            yield join_chunks(pending)
            pending = []


class Client:
    def __init__(self, address: str = DEFAULT_ADDRESS, *, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 server_name: str | None = None):
        options = [("grpc.max_receive_message_length", 4 << 20)]
        if tls_ca:
            def read(p):
                with open(p, "rb") as f:
                    return f.read()
            creds = grpc.ssl_channel_credentials(read(tls_ca), tls_key and read(tls_key),
                                                 tls_cert and read(tls_cert))
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            self.channel = grpc.secure_channel(address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.DirtyTrackerStub(self.channel)
        self._last: dict[str, int] = {}

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def attach(self, pid: int, *, names=(), ranges=(), no_default=False, timeout=30):
        sel = pb.Selection(no_default=no_default, names=list(names),
                           ranges=[pb.AddressRange(start=lo, end=hi) for lo, hi in ranges])
        return self.stub.Attach(pb.AttachRequest(pid=pid, selection=sel), timeout=timeout)

    def targets(self):
        return self.stub.ListTargets(pb.ListTargetsRequest(), timeout=10).targets

    def describe(self, target_id: str):
        return self.stub.DescribeTarget(pb.DescribeTargetRequest(target_id=target_id),
                                        timeout=10).target

    def resolve(self, target: str) -> str:
        """A target id from an id or a pid."""
        if target.isdigit():
            for t in self.targets():
                if t.pid == int(target):
                    return t.target_id
            raise SystemExit(f"process {target} is not tracked: `dirtytrack attach {target}`")
        return target

    def open_cursor(self, target_id: str, *, start_full=False, label="") -> str:
        return self.stub.OpenCursor(pb.OpenCursorRequest(
            target_id=target_id, start_full=start_full, label=label), timeout=10).cursor_id

    def collect(self, cursor_id: str, after_seq: int | None = None, timeout=60) -> DirtySetView:
        """The set after `after_seq` (default: the last one this client received)."""
        after = self._last.get(cursor_id, 0) if after_seq is None else after_seq
        responses = self.stub.Collect(pb.CollectRequest(cursor_id=cursor_id, after_seq=after),
                                      timeout=timeout)
        view = join_chunks(r.chunk for r in responses)
        for _ in responses:          # the server ends the call after the last chunk: read its
            pass                     # OK status rather than cancel it (metrics count CANCELLED)
        self._last[cursor_id] = view.seq
        return view

    def ack(self, cursor_id: str, seq: int) -> int:
        return self.stub.Acknowledge(pb.AcknowledgeRequest(cursor_id=cursor_id, seq=seq),
                                     timeout=10).acked_seq

    def subscribe(self, cursor_id: str, *, resume_after=0, interval_ms=0, window=0,
                  skip_empty=False):
        """(call, iterator of DirtySetViews); call.cancel() ends it."""
        call = self.stub.Subscribe(pb.SubscribeRequest(
            cursor_id=cursor_id, resume_after=resume_after, interval_ms=interval_ms,
            window=window, skip_empty=skip_empty))
        return call, sets(call)
