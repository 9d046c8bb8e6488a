"""The DirtyTracker RPCs: validate, call the registry, encode, map errors."""
from __future__ import annotations

import asyncio
import functools
import logging
import time

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from dirtytrack import errors as core_errors
from dirtytrack._core import PAGE_SIZE
from dirtytrack.daemon import errors
from dirtytrack.daemon.encoding import encode_set
from dirtytrack.maps import Selection
from dirtytrack.v1 import dirtytrack_pb2 as pb
from dirtytrack.v1 import dirtytrack_pb2_grpc as pb_grpc

log = logging.getLogger("dirtytrack.daemon")

TARGET_STATE = {"tracking": pb.TARGET_STATE_TRACKING, "exited": pb.TARGET_STATE_EXITED,
                "failed": pb.TARGET_STATE_FAILED, "detached": pb.TARGET_STATE_FAILED}
SHUTDOWN = ("the daemon is shutting down; cursors do not survive a restart: open a new "
            "cursor on the restarted daemon and resend everything (full resync)")


def _status_for(exc: Exception) -> tuple[str, str, list]:
    """(code name, message, google.rpc details) for an exception."""
    if isinstance(exc, errors.BadRequest):
        return exc.code, exc.message, [error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=exc.field,
                                                        description=exc.message)])]
    if isinstance(exc, errors.NotFound):
        return exc.code, exc.message, [error_details_pb2.ResourceInfo(
            resource_type=exc.resource_type, resource_name=exc.name, description=exc.message)]
    if isinstance(exc, errors.Precondition):
        return exc.code, exc.message, [error_details_pb2.ErrorInfo(
            reason=exc.reason, domain=errors.DOMAIN, metadata=exc.metadata)]
    if isinstance(exc, errors.DaemonError):
        return exc.code, exc.message, []
    info = lambda: [error_details_pb2.ErrorInfo(       # noqa: E731
        reason=type(exc).__name__.upper(), domain=errors.DOMAIN,
        metadata={"errno": str(exc.errno or 0)})]
    if isinstance(exc, core_errors.ProcessGone):
        return "NOT_FOUND", exc.message, info()
    if isinstance(exc, (core_errors.PtraceDenied, core_errors.UserfaultfdUnavailable)):
        return "PERMISSION_DENIED", exc.message, info()
    if isinstance(exc, core_errors.InvalidRange):
        return "INVALID_ARGUMENT", exc.message, [error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="selection",
                                                        description=exc.message)])]
    if isinstance(exc, (core_errors.RangeBusy, core_errors.KernelUnsupported,
                        core_errors.InjectionFailed, core_errors.TrackerClosed)):
        return "FAILED_PRECONDITION", exc.message, info()
    return "INTERNAL", f"internal error: {type(exc).__name__}: {exc}", []


async def abort(context, exc: Exception):
    code, message, details = _status_for(exc)
    status = status_pb2.Status(code=getattr(code_pb2, code), message=message)
    for d in details:
        packed = any_pb2.Any()
        packed.Pack(d)
        status.details.append(packed)
    st = rpc_status.to_status(status)
    if code == "INTERNAL":
        log.exception("internal error", exc_info=exc)
    await context.abort(st.code, st.details, st.trailing_metadata)


def rpc(handler):
    """Turn daemon and dirtytrack exceptions into a status with details."""
    @functools.wraps(handler)
    async def wrapper(self, request, context):
        try:
            return await handler(self, request, context)
        except (errors.DaemonError, core_errors.DirtytrackError) as exc:
            failure = exc
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:            # noqa: BLE001
            failure = exc
        await abort(context, failure)
    return wrapper


def target_info(target, detail: bool = False) -> pb.TargetInfo:
    tr = target.tracker
    mappings = tr.mappings() if target.state == "tracking" else []
    sel = target.selection
    info = pb.TargetInfo(
        target_id=target.id, pid=target.pid, state=TARGET_STATE[target.state],
        mappings_tracked=len(mappings), bytes_tracked=sum(m["end"] - m["start"] for m in mappings),
        page_size=PAGE_SIZE, scan_interval_ms=int(target.interval * 1000), scans=target.scans,
        last_scan_us=target.last_scan_us, cursor_count=len(target.cursors), error=target.error,
        attach_stopped_us=tr.attach_stopped_ns // 1000,
        selection=pb.Selection(no_default=not sel.default, names=sel.names,
                               ranges=[pb.AddressRange(start=lo, end=hi) for lo, hi in sel.ranges]))
    if detail:
        for m in mappings:
            info.mappings.add(mapping_id=m["mapping_id"], start=m["start"], end=m["end"],
                              name=m["name"], kind=m["kind"])
        if target.state == "tracking":
            for s in tr.skipped():
                info.skipped.add(start=s["start"], end=s["end"], name=s["name"],
                                 perms=s["perms"], reason=s["reason"])
        for m, unix in target.events:
            info.events.add(mapping_id=m.mapping_id, start=m.start, end=m.end, name=m.name,
                            status=(pb.MAPPING_STATUS_LOST if m.status == "lost"
                                    else pb.MAPPING_STATUS_REMOVED),
                            reason=m.reason or "", unix_nanos=unix)
        for c in target.cursors.values():
            info.cursors.add(cursor_id=c.id, delivered_seq=c.delivered, acked_seq=c.acked,
                             unacked_sets=len(c.unacked), pending_pages=c.pending.count,
                             held_bytes=c.held_bytes(), subscribed=c.consumer is not None,
                             label=c.label)
    return info


def _selection(request: pb.AttachRequest) -> Selection:
    sel = request.selection
    ranges = []
    for i, r in enumerate(sel.ranges):
        if r.start >= r.end or r.start % PAGE_SIZE or r.end % PAGE_SIZE:
            raise errors.BadRequest(f"selection.ranges[{i}]", (
                f"range [{r.start:#x}, {r.end:#x}) must be non-empty and page aligned "
                f"({PAGE_SIZE} bytes)"))
        ranges.append((r.start, r.end))
    if sel.no_default and not sel.names and not ranges:
        raise errors.BadRequest("selection", "no_default with no names and no ranges selects "
                                "nothing: add a name pattern or an address range")
    return Selection(default=not sel.no_default, names=tuple(sel.names), ranges=tuple(ranges))


class DirtyTrackerServicer(pb_grpc.DirtyTrackerServicer):
    def __init__(self, registry):
        self.registry = registry
        self.config = registry.config

    def _live(self):
        if self.registry.stopping:
            raise errors.ShuttingDown(SHUTDOWN)

    @rpc
    async def Attach(self, request, context):
        self._live()
        if request.pid <= 0:
            raise errors.BadRequest("pid", f"pid {request.pid} is not a process id")
        target, existing = await self.registry.attach(request.pid, _selection(request),
                                                      request.allow_seccomp)
        return pb.AttachResponse(target=target_info(target, detail=True),
                                 already_attached=existing)

    @rpc
    async def Detach(self, request, context):
        target = self.registry.target(request.target_id)
        await self.registry.detach(target, "detached by request")
        return pb.DetachResponse()

    @rpc
    async def ListTargets(self, request, context):
        return pb.ListTargetsResponse(
            targets=[target_info(t) for t in self.registry.targets.values()])

    @rpc
    async def DescribeTarget(self, request, context):
        return pb.DescribeTargetResponse(
            target=target_info(self.registry.target(request.target_id), detail=True))

    @rpc
    async def OpenCursor(self, request, context):
        self._live()
        target = self.registry.target(request.target_id)
        cursor = target.open_cursor(request.start_full, request.label)
        return pb.OpenCursorResponse(cursor_id=cursor.id, page_size=PAGE_SIZE)

    @rpc
    async def CloseCursor(self, request, context):
        cursor = self.registry.cursor(request.cursor_id)
        self.registry.forget_cursor(cursor, "closed by CloseCursor")
        return pb.CloseCursorResponse()

    @rpc
    async def Acknowledge(self, request, context):
        cursor = self.registry.cursor(request.cursor_id)
        cursor.ack(request.seq)
        return pb.AcknowledgeResponse(acked_seq=cursor.acked)

    def _next_set(self, cursor):
        target = cursor.target
        if target.state in ("failed", "detached") and cursor.pending.empty:
            raise errors.Precondition("TRACKING_ENDED", (
                f"tracking of target {target.id} (pid {target.pid}) ended: "
                f"{target.error or target.state}; everything owed was delivered. Attach again "
                "and resend everything"), target_id=target.id)
        seq, state = cursor.deliver()
        if target.state == "exited":
            state.exited = True
        return seq, encode_set(state, cursor_id=cursor.id, target_id=target.id, seq=seq,
                               max_bytes=self.config.max_message_bytes)

    def _check_cursor(self, cursor, token):
        if cursor.closed_reason:
            raise errors.NotFound("cursor", cursor.id, f"cursor {cursor.id}: "
                                  f"{cursor.closed_reason}")
        if self.registry.stopping:
            raise errors.ShuttingDown(SHUTDOWN)
        if cursor.consumer is not token:
            raise errors.Superseded(f"cursor {cursor.id} was taken over by a newer Subscribe "
                                    "or Collect; only one reader per cursor")

    @rpc
    async def Collect(self, request, context):
        self._live()
        cursor = self.registry.cursor(request.cursor_id)
        cursor._check_seq(request.after_seq, "after_seq")
        token = cursor.take_over()
        try:
            if cursor.target.state == "tracking":
                await cursor.target.scan()
            self._check_cursor(cursor, token)
            cursor.rewind(request.after_seq)
            _, chunks = self._next_set(cursor)
            for chunk in chunks:
                await context.write(pb.CollectResponse(chunk=chunk))
        finally:
            cursor.release(token)

    @rpc
    async def Subscribe(self, request, context):
        self._live()
        cfg = self.config
        cursor = self.registry.cursor(request.cursor_id)
        cursor._check_seq(request.resume_after, "resume_after")
        ms = request.interval_ms or cfg.default_interval_ms
        interval = min(max(ms, cfg.min_interval_ms), cfg.max_interval_ms) / 1000
        window = min(max(request.window or cfg.default_window, 1), 64)
        token = cursor.take_over()
        target = cursor.target
        target.want_interval(token, interval)
        try:
            cursor.rewind(request.resume_after)
            due = time.monotonic()
            slack = min(interval / 2, 0.005)
            while True:
                self._check_cursor(cursor, token)
                now = time.monotonic()
                ended = target.state != "tracking"
                ready = (len(cursor.unacked) < window and now >= due - slack
                         and (cursor.pending.scans > 0 or cursor.pending.resync or ended)
                         and not (request.skip_empty and cursor.pending.empty
                                  and not cursor.pending.resync and not ended))
                if ready:
                    _, chunks = self._next_set(cursor)
                    for chunk in chunks:
                        await context.write(pb.SubscribeResponse(chunk=chunk))
                    if ended:
                        return                    # the final set went out: end with OK
                    due = max(due + interval, now)
                    continue
                cursor.wake.clear()
                wait = max(due - now, 0.0) if now < due - slack else None
                try:
                    await asyncio.wait_for(cursor.wake.wait(), wait)
                except asyncio.TimeoutError:
                    pass
        finally:
            target.drop_interval(token)
            cursor.release(token)
