"""The daemon end to end: a real `dirtytrack serve` on a real Unix socket,
real target processes (workloads/target.c) whose writes are the ground truth.
"""
from __future__ import annotations

import asyncio
import bisect
import os
import random
import signal
import subprocess
import sys
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from daemon_support import Daemon, _pythonpath
from dirtytrack.daemon.client import Client, join_chunks
from dirtytrack.v1 import dirtytrack_pb2 as pb
from dirtytrack.v1 import dirtytrack_pb2_grpc as pb_grpc
from workloads.target import PAGE, Target

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="attaching needs root (ptrace)")


@pytest.fixture(scope="module")
def daemon():
    d = Daemon()
    yield d
    d.close()



@pytest.fixture
def client(daemon):
    with Client(daemon.address) as c:
        yield c


def attach_buf(c: Client, t: Target, npages: int):
    buf = t.map(npages)
    target = c.attach(t.pid).target
    return buf, target.target_id


def in_buf(pages, buf, npages):
    return {(a - buf) // PAGE for a in pages if buf <= a < buf + npages * PAGE}


def check_windows(log, collects, who=""):
    """log: (page, finished_before, started_after) from target.c; collects: this
    cursor's [(start_no, finish_no, pages)] in order. A write must be in a set
    that finished after it began and started no later than the first set that
    started after it completed."""
    starts = [c[0] for c in collects]
    finishes = [c[1] for c in collects]
    need: dict[tuple[int, int], set] = {}
    for page, fin, started in log:
        hi = bisect.bisect_right(starts, started)       # first collect starting after the write
        if hi >= len(collects):
            continue                                     # after the final collect: unprovable
        lo = bisect.bisect_right(finishes, fin)          # first collect finishing after it began
        need.setdefault((lo, hi), set()).add(page)
    missed = []
    for (lo, hi), pages in need.items():
        union = set().union(*(collects[k][2] for k in range(lo, hi + 1)))
        missed += [(p, lo, hi) for p in pages - union]
    assert missed == [], f"{who}: {len(missed)} writes missed, e.g. {sorted(missed)[:5]}"


def stop_writer(t: Target) -> set:
    """Stop the target's writer; its log deduplicated while read (the writer logs
    ~10 million writes a second: keeping them all would take gigabytes)."""
    t.proc.stdin.write("stop\n")
    t.proc.stdin.flush()
    log = set()
    for line in t.proc.stdout:
        if line.startswith("stopped"):
            return {(int(a), int(b), int(c)) for a, b, c in log}
        log.add(tuple(line.split()[1:]))
    raise AssertionError("the target died while printing its log")


def rich(exc: grpc.RpcError):
    status = rpc_status.from_call(exc)
    out = {}
    for d in status.details if status else []:
        for cls in (error_details_pb2.BadRequest, error_details_pb2.ErrorInfo,
                    error_details_pb2.ResourceInfo):
            if d.Is(cls.DESCRIPTOR):
                msg = cls()
                d.Unpack(msg)
                out[cls.__name__] = msg
    return out


# -- ground truth ---------------------------------------------------------------

def test_collect_covers_every_logged_write(client, target):
    t = target()
    npages = 2048
    buf, tid = attach_buf(client, t, npages)
    cursor = client.open_cursor(tid)
    t.start_writer(buf, npages)
    collects = []
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        t.counters[1] += 1
        start_no = t.counters[1]
        s = client.collect(cursor)
        t.counters[0] += 1
        assert not s.full_resync or all("realloc" in m or "mremap" in m or "moved" in m
                                        or "lost" in m for _, m in s.resync), s.resync
        collects.append((start_no, t.counters[0], in_buf(s.pages(), buf, npages)))
    log = stop_writer(t)
    t.counters[1] += 1
    s = client.collect(cursor)
    collects.append((t.counters[1], t.counters[0] + 1, in_buf(s.pages(), buf, npages)))
    assert len(log) > 1000 and len(collects) > 10
    assert [c for c in range(1, len(collects) + 1)] == list(range(1, s.seq + 1))  # gapless
    check_windows(log, collects, "collect")


def test_subscribe_covers_every_write(client, target):
    """Writes the test makes itself, timed on CLOCK_MONOTONIC: each must be in
    a set no later than the first set whose newest scan started after it, and
    no earlier than the last set whose scan started before it (which may have
    been still running)."""
    t = target()
    npages = 512
    buf, tid = attach_buf(client, t, npages)
    cursor = client.open_cursor(tid)
    call, stream = client.subscribe(cursor, interval_ms=10)
    received = []
    import threading

    def reader():
        try:
            for s in stream:
                received.append((s.seq, s.scan_mono_ns, in_buf(s.pages(), buf, npages)))
                client.ack(cursor, s.seq)
        except grpc.RpcError:
            pass

    th = threading.Thread(target=reader)
    th.start()
    rng = random.Random(7)
    writes = []
    for _ in range(300):
        page = rng.randrange(npages)
        began = time.monotonic_ns()
        t.write(buf + page * PAGE)
        writes.append((page, began, time.monotonic_ns()))
        if rng.random() < 0.3:
            time.sleep(rng.random() * 0.02)
    time.sleep(0.3)
    call.cancel()
    th.join()
    seqs = [r[0] for r in received]
    assert seqs == list(range(1, len(seqs) + 1)), "sequence numbers must be gapless"
    scan_times = [r[1] for r in received]
    for page, began, done in writes:
        last = bisect.bisect_right(scan_times, done)
        assert last < len(received), "no set after the last write"
        # The newest scan of the set before `began` may still have been running.
        first = max(0, bisect.bisect_left(scan_times, began) - 1)
        ok = any(page in received[k][2] for k in range(first, last + 1))
        assert ok, f"page {page} written {began}..{done} missed; sets around: " + str(
            [(r[0], r[1], page in r[2], len(r[2])) for r in received[max(0, last - 3):last + 3]])


def test_fifty_cursors_each_see_every_write(daemon, client, target):
    t = target()
    npages = 2048
    buf, tid = attach_buf(client, t, npages)
    cursors = [client.open_cursor(tid, label=f"c{i}") for i in range(50)]
    t.start_writer(buf, npages)
    results = {c: [] for c in cursors}

    async def run():
        async with grpc.aio.insecure_channel(daemon.address) as ch:
            stub = pb_grpc.DirtyTrackerStub(ch)
            stop = time.monotonic() + 0.4

            async def one(cursor, final=False):
                after = 0
                while True:
                    t.counters[1] += 1
                    start_no = t.counters[1]
                    call = stub.Collect(pb.CollectRequest(cursor_id=cursor, after_seq=after))
                    s = join_chunks([r.chunk async for r in call])
                    t.counters[0] += 1
                    results[cursor].append((start_no, t.counters[0], in_buf(s.pages(), buf,
                                                                            npages)))
                    assert s.seq == after + 1
                    after = s.seq
                    if time.monotonic() > stop:
                        return after

            return await asyncio.gather(*(one(c) for c in cursors))

    afters = asyncio.run(run())
    log = stop_writer(t)
    for cursor, after in zip(cursors, afters):          # a final set after the writer stopped
        t.counters[1] += 1
        start_no = t.counters[1]
        s = client.collect(cursor, after_seq=after)
        t.counters[0] += 1
        results[cursor].append((start_no, t.counters[0], in_buf(s.pages(), buf, npages)))
    assert len(log) > 1000
    for cursor in cursors:
        assert len(results[cursor]) >= 3
        check_windows(log, results[cursor], cursor)
    info = client.describe(tid)
    assert info.cursor_count == 50 and info.scans < sum(len(r) for r in results.values()), \
        "concurrent Collects should share scans"


CLIENT = r"""
import sys
from dirtytrack.daemon.client import Client
c = Client(sys.argv[1])
call, stream = c.subscribe(sys.argv[2], resume_after=int(sys.argv[3]), interval_ms=10)
for s in stream:
    print("set", s.seq, " ".join(str(a) for a in sorted(s.pages())), flush=True)
    c.ack(sys.argv[2], s.seq)
    print("acked", s.seq, flush=True)
"""


def test_killed_client_resumes_without_gap(daemon, client, target):
    t = target()
    npages = 256
    buf, tid = attach_buf(client, t, npages)
    cursor = client.open_cursor(tid)
    env = dict(os.environ, PYTHONPATH=_pythonpath())
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, daemon.address, cursor, "0"],
                            stdout=subprocess.PIPE, text=True, env=env)
    written, seen, acked = set(), {}, 0
    for i in range(60):
        t.write(buf + i * PAGE)
        written.add(buf + i * PAGE)
        time.sleep(0.005)
    while acked < 5:
        kind, seq, *pages = proc.stdout.readline().split()
        if kind == "set":
            seen[int(seq)] = {int(p) for p in pages}
        else:
            acked = int(seq)
    os.kill(proc.pid, signal.SIGKILL)             # mid-stream: sets after `acked` may be lost
    proc.wait()
    for line in proc.stdout:                      # what it managed to record before dying
        kind, seq, *pages = line.split()
        if kind == "set":
            seen[int(seq)] = {int(p) for p in pages}
        else:
            acked = int(seq)
    proc.stdout.close()
    for i in range(60, 120):                     # writes while no client reads
        t.write(buf + i * PAGE)
        written.add(buf + i * PAGE)
    # The client printed each set before acknowledging it, and may have died
    # between its ack reaching the daemon and its "acked" line: what it durably
    # holds is every set it printed, so that is where it resumes (asking for
    # the set after k acknowledges k).
    acked = max(seen)
    call, stream = client.subscribe(cursor, resume_after=acked, interval_ms=10)
    seqs = []
    for s in stream:
        seqs.append(s.seq)
        seen[s.seq] = s.pages()
        if s.seq > acked + 2:
            break
    call.cancel()
    assert seqs[0] == acked + 1, "resume must continue right after the last acknowledged set"
    got = set().union(*(seen[k] for k in range(1, max(seqs) + 1)))
    assert written <= got, f"missed {sorted(written - got)[:5]}"


def test_stalled_subscriber_is_bounded_by_its_bitmap(daemon, client, target):
    t = target()
    npages = 1 << 16                              # 256 MiB: an 8 KiB bitmap
    buf, tid = attach_buf(client, t, npages)
    cursor = client.open_cursor(tid)
    call, stream = client.subscribe(cursor, interval_ms=10, window=4)
    first = next(stream)                          # then stop reading and acknowledging
    rss0 = daemon.rss_kib()
    rng = random.Random(3)
    written = set()
    deadline = time.monotonic() + 2.0             # ~200 ticks of writes
    while time.monotonic() < deadline:
        page = rng.randrange(npages - 64)
        t.write(buf + page * PAGE, 64)
        written |= {buf + (page + i) * PAGE for i in range(64)}
        time.sleep(0.002)
    info = client.describe(tid)
    rss1 = daemon.rss_kib()
    c = [x for x in info.cursors if x.cursor_id == cursor][0]
    assert c.unacked_sets <= 4 and c.delivered_seq <= first.seq + 4, c
    assert c.held_bytes <= 6 * (npages // 8), c  # window + pending bitmaps, nothing more
    assert rss1 - rss0 < 32 << 10, f"daemon grew {rss1 - rss0} KiB"
    # Now catch up: the sets still owed hold every page written meanwhile.
    got = set(first.pages())
    for s in stream:
        got |= s.pages()
        client.ack(cursor, s.seq)
        if s.scan_mono_ns > time.monotonic_ns() - 5_000_000:
            break
    call.cancel()
    assert written <= got, f"{len(written - got)} pages missed"


def test_exec_and_exit_are_full_resyncs(client, target):
    t = target()
    buf, tid = attach_buf(client, t, 8)
    cursor = client.open_cursor(tid)
    client.collect(cursor)
    t.proc.stdin.write("exec\n")
    t.proc.stdin.flush()
    assert t.proc.stdout.readline().split()[0] == "ready"
    s = client.collect(cursor)
    assert s.full_resync and any(code == pb.RESYNC_CODE_TARGET_EXEC for code, _ in s.resync)
    assert s.removed
    t.proc.stdin.write("exit\n")
    t.proc.stdin.flush()
    t.proc.wait()
    s = client.collect(cursor)
    assert s.full_resync and s.exited
    assert any(code == pb.RESYNC_CODE_TARGET_EXITED for code, _ in s.resync)
    s = client.collect(cursor)                   # later sets still say so
    assert s.exited


def test_start_full_cursor_gets_everything_first(client, target):
    t = target()
    buf, tid = attach_buf(client, t, 16)
    s = client.collect(client.open_cursor(tid, start_full=True))
    assert s.full_resync and in_buf(s.pages(), buf, 16) == set(range(16))


def test_lost_answer_is_redelivered_and_acks_are_checked(client, target):
    t = target()
    buf, tid = attach_buf(client, t, 16)
    cursor = client.open_cursor(tid)
    t.write(buf + 3 * PAGE)
    s1 = client.collect(cursor, after_seq=0)
    t.write(buf + 5 * PAGE)
    again = client.collect(cursor, after_seq=0)   # the answer to s1 "got lost"
    assert again.seq == s1.seq == 1
    assert in_buf(again.pages(), buf, 16) == {3, 5}
    s2 = client.collect(cursor, after_seq=1)
    assert s2.seq == 2
    with pytest.raises(grpc.RpcError) as e:
        client.collect(cursor, after_seq=0)       # set 1 was acknowledged by asking for 2
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rich(e.value)["ErrorInfo"].reason == "ALREADY_ACKNOWLEDGED"
    with pytest.raises(grpc.RpcError) as e:
        client.collect(cursor, after_seq=9)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rich(e.value)["BadRequest"].field_violations[0].field == "after_seq"


def test_bad_requests_get_actionable_statuses(client, target):
    def err(fn):
        with pytest.raises(grpc.RpcError) as e:
            fn()
        return e.value

    e = err(lambda: client.attach(0))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "pid" in e.details()
    e = err(lambda: client.attach(2 ** 22 + 4321))
    assert e.code() == grpc.StatusCode.NOT_FOUND and "no process" in e.details()
    e = err(lambda: client.attach(os.getpid(), no_default=True, ranges=[(4097, 8192)]))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rich(e)["BadRequest"].field_violations[0].field == "selection.ranges[0]"
    e = err(lambda: client.attach(2))          # kthreadd
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "kernel thread" in e.details()
    e = err(lambda: client.open_cursor("tgt-nope"))
    assert e.code() == grpc.StatusCode.NOT_FOUND and "ListTargets" in e.details()
    assert rich(e)["ResourceInfo"].resource_type == "target"
    e = err(lambda: client.collect(""))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    t = target()
    t.map(4)
    tid = client.attach(t.pid).target.target_id
    again = client.attach(t.pid)
    assert again.already_attached and again.target.target_id == tid
    e = err(lambda: client.attach(t.pid, names=["[heap]"]))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "detach" in e.details()
    client.stub.Detach(pb.DetachRequest(target_id=tid))
    e = err(lambda: client.open_cursor(tid))
    assert e.code() == grpc.StatusCode.NOT_FOUND and "detached" in e.details()


def test_targets_describe_and_detach(client, target):
    t = target()
    buf, tid = attach_buf(client, t, 32)
    ids = {x.target_id: x for x in client.targets()}
    assert ids[tid].pid == t.pid and ids[tid].state == pb.TARGET_STATE_TRACKING
    cursor = client.open_cursor(tid, label="mine")
    t.cmd(f"unmap {buf} 32")
    client.collect(cursor)
    info = client.describe(tid)
    assert info.bytes_tracked > 0 and info.mappings_tracked == len(info.mappings)
    assert any(e.start == buf and e.status == pb.MAPPING_STATUS_REMOVED for e in info.events)
    assert any(s.name == "[vdso]" for s in info.skipped)
    assert [c.label for c in info.cursors] == ["mine"]
    client.stub.Detach(pb.DetachRequest(target_id=tid))
    with pytest.raises(grpc.RpcError) as e:
        client.collect(cursor)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


# -- daemon life ----------------------------------------------------------------

def test_sigkill_restart_old_cursors_answer_clearly(target):
    d = Daemon()
    try:
        t = target()
        buf = t.map(16)
        with Client(d.address) as c:
            tid = c.attach(t.pid).target.target_id
            cursor = c.open_cursor(tid)
            t.write(buf)
            c.collect(cursor)
        d.kill()
        t.write(buf + PAGE)                       # written while nobody tracks
        d2 = Daemon(sock_dir=d.dir)               # same socket: the stale file is replaced
        with Client(d2.address) as c:
            for call in (lambda: c.collect(cursor, after_seq=1),
                         lambda: next(c.subscribe(cursor, resume_after=1)[1]),
                         lambda: c.ack(cursor, 1), lambda: c.open_cursor(tid)):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "earlier run of the daemon" in e.value.details()
                assert rich(e.value)["ErrorInfo"].reason == "DAEMON_RESTARTED"
            # The old registration died with the old daemon: attaching again works.
            tid2 = c.attach(t.pid).target.target_id
            s = c.collect(c.open_cursor(tid2, start_full=True))
            assert s.full_resync and in_buf(s.pages(), buf, 16) == set(range(16))
        d2.close()
    finally:
        if d.proc.poll() is None:
            d.close()


def test_health_reflection_and_sigterm(target):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase)
    from google.protobuf.descriptor_pool import DescriptorPool

    d = Daemon()
    try:
        assert oct(os.stat(d.socket).st_mode & 0o777) == "0o600"
        with grpc.insecure_channel(d.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for name in ("", "dirtytrack.v1.DirtyTracker"):
                r = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert r.status == health_pb2.HealthCheckResponse.SERVING
            db = ProtoReflectionDescriptorDatabase(ch)
            assert "dirtytrack.v1.DirtyTracker" in db.get_services()
            pool = DescriptorPool(db)
            svc = pool.FindServiceByName("dirtytrack.v1.DirtyTracker")
            assert {"Attach", "Collect", "Subscribe", "Acknowledge"} <= {
                m.name for m in svc.methods}
            assert pool.FindMessageTypeByName("dirtytrack.v1.DirtySetChunk").fields_by_name["seq"]

            t = target()
            t.map(8)
            c = Client(d.address)
            cursor = c.open_cursor(c.attach(t.pid).target.target_id)
            call, stream = c.subscribe(cursor, interval_ms=50)
            next(stream)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            d.proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as e:
                for _ in stream:
                    pass
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in e.value.details()
            c.close()
        assert d.proc.wait(15) == 0
        assert not os.path.exists(d.socket)
        # The target was released: another tracker can register its memory now.
        import dirtytrack
        with dirtytrack.attach(t.pid) as tr:
            tr.collect()
    finally:
        d.close()


def test_collect_cancelled_mid_scan_never_shrinks_another_cursor(client, target):
    """A Collect whose deadline fires while its forced scan runs: the scan
    still reaches every cursor (the kernel already reset those pages)."""
    t = target()
    nbig = 1 << 18                                   # 1 GiB: a scan of a few ms
    big = t.map(nbig)
    small = t.map(8)
    tid = client.attach(t.pid).target.target_id
    a, b = client.open_cursor(tid), client.open_cursor(tid)
    client.collect(a)
    client.collect(b)
    t.write(big, nbig)
    client.collect(b)
    scan_s = max(client.describe(tid).last_scan_us / 1e6, 0.001)
    cancelled = 0
    for i in range(20):
        t.write(big, nbig, i)                        # much to reset: a slower scan
        t.write(small + (i % 8) * PAGE, 1, i)
        try:
            client.collect(b, timeout=scan_s * (0.2 + 0.15 * (i % 6)))
        except grpc.RpcError as exc:
            cancelled += exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        s = client.collect(a)
        assert small + (i % 8) * PAGE in s.pages() or s.full_resync, f"round {i}: page lost"
    assert cancelled, "no Collect was cancelled mid-scan: the case was not exercised"


def test_exec_that_cannot_be_followed_ends_the_stream_with_a_resync(client, target):
    """The new program runs under a seccomp filter, so re-injection is refused:
    subscribers get a full-resync set saying tracking ended, then the stream
    ends; the target is no longer 'tracking'. Never silence."""
    t = target()
    buf, tid = attach_buf(client, t, 8)
    cursor = client.open_cursor(tid)
    call, stream = client.subscribe(cursor, interval_ms=20)
    first = next(stream)
    assert first.seq == 1
    t.cmd("seccomp")
    t.proc.stdin.write("exec\n")
    t.proc.stdin.flush()
    assert t.proc.stdout.readline().split()[0] == "ready"
    resync = None
    for s in stream:                              # ends once the target is over
        if s.full_resync:
            resync = s
    assert resync is not None
    assert any(code == pb.RESYNC_CODE_TARGET_EXEC and "tracking ended" in msg
               for code, msg in resync.resync)
    assert client.describe(tid).state != pb.TARGET_STATE_TRACKING
