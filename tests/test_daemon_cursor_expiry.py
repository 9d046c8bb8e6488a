"""Idle cursors expire (cursor_idle_timeout_s), cursors in use do not: a real daemon
configured with a 1 s expiry through DIRTYTRACK_CURSOR_IDLE_TIMEOUT_S, and real
targets (workloads/target.c)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from daemon_support import Daemon, _pythonpath
from dirtytrack.daemon.client import Client
from dirtytrack.v1 import dirtytrack_pb2 as pb
from workloads.target import PAGE

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="attaching needs root (ptrace)")

EXPIRY = 1.0          # seconds; the daemon checks every EXPIRY / 4


@pytest.fixture(scope="module")
def daemon():
    d = Daemon(env={"DIRTYTRACK_CURSOR_IDLE_TIMEOUT_S": str(EXPIRY)})
    yield d
    d.close()


@pytest.fixture
def target(target):
    """One target process (conftest's factory, used once)."""
    return target()


@pytest.fixture
def client(daemon):
    with Client(daemon.address) as c:
        yield c


def in_buf(pages, buf, npages):
    return {(a - buf) // PAGE for a in pages if buf <= a < buf + npages * PAGE}


def cursor_ids(c: Client, tid: str) -> set[str]:
    return {x.cursor_id for x in c.describe(tid).cursors}


def wait_expired(c: Client, tid: str, cursors: set[str], timeout: float = 5 * EXPIRY) -> float:
    """Seconds until none of `cursors` is listed any more (DescribeTarget does not touch them)."""
    t0 = time.monotonic()
    while cursor_ids(c, tid) & cursors:
        assert time.monotonic() - t0 < timeout, "idle cursors did not expire"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_idle_cursor_expires_with_an_actionable_status(client, target):
    buf = target.map(16)
    tid = client.attach(target.pid).target.target_id
    idle = client.open_cursor(tid, label="idle")
    busy = client.open_cursor(tid, label="busy")
    opened = time.monotonic()
    while time.monotonic() - opened < 3 * EXPIRY:        # busy keeps reading, idle does not
        client.collect(busy)
        time.sleep(EXPIRY / 4)
    assert cursor_ids(client, tid) == {busy}
    assert client.describe(tid).cursor_count == 1

    calls = {
        "Collect": lambda: client.collect(idle, after_seq=0),
        "Acknowledge": lambda: client.ack(idle, 0),
        "Subscribe": lambda: next(client.subscribe(idle)[1]),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.NOT_FOUND, (name, e.value)
        message = e.value.details()
        assert idle in message and "expired after 1 s without requests" in message, message
        # What it owed is gone: the client must start over with everything, and be told so.
        assert "start_full" in message and "resend everything" in message, message
        info = [d for d in rpc_status.from_call(e.value).details
                if d.Is(error_details_pb2.ResourceInfo.DESCRIPTOR)]
        assert len(info) == 1, (name, rpc_status.from_call(e.value))
        res = error_details_pb2.ResourceInfo()
        info[0].Unpack(res)
        assert (res.resource_type, res.resource_name) == ("cursor", idle)
    # The busy cursor lost nothing meanwhile; a new cursor works as the message says.
    target.write(buf, 2)
    assert in_buf(client.collect(busy).pages(), buf, 16) == {0, 1}
    fresh = client.open_cursor(tid, start_full=True)
    s = client.collect(fresh)
    assert s.full_resync and in_buf(s.pages(), buf, 16) == set(range(16))
    client.stub.Detach(pb.DetachRequest(target_id=tid), timeout=10)


def test_expired_cursors_release_their_memory(daemon, client, target):
    """start_full cursors on a 1 GiB mapping each own a 32 KiB bitmap. If expired ones
    were kept (in the registry, a tombstone, a task...), a second round of cursors would
    grow the daemon by another round's worth."""
    npages = 1 << 18
    count = 200                                   # 200 x 32 KiB = 6.25 MiB per round
    target.map(npages)
    tid = client.attach(target.pid).target.target_id

    def round_of_cursors() -> set[str]:
        ids = {client.open_cursor(tid, start_full=True) for _ in range(count)}
        held = {x.cursor_id: x.held_bytes for x in client.describe(tid).cursors}
        assert set(held) == ids
        assert all(h >= npages // 8 for h in held.values()), "each should own its bitmap"
        return ids

    first = round_of_cursors()
    rss_first = daemon.rss_kib()
    wait_expired(client, tid, first)
    assert client.describe(tid).cursor_count == 0
    second = round_of_cursors()
    rss_second = daemon.rss_kib()
    round_kib = count * (npages // 8) >> 10
    assert rss_second - rss_first < round_kib // 2, (
        f"the daemon grew {rss_second - rss_first} KiB for a second round of {round_kib} KiB "
        "after the first expired: expired cursors kept their memory")
    wait_expired(client, tid, second)
    client.stub.Detach(pb.DetachRequest(target_id=tid), timeout=10)


@pytest.mark.parametrize("how", ["skip_empty", "stalled"])
def test_cursor_in_use_does_not_expire(client, target, how):
    """A Subscribe stream can sit for longer than the expiry without a set going out
    (skip_empty on a quiet target) or without acknowledging (a stalled reader). Its cursor
    is in use all along, and it must survive the stream ending: a client that reconnects
    right away, within the expiry, resumes where it was."""
    npages = 64
    buf = target.map(npages)
    tid = client.attach(target.pid).target.target_id
    cursor = client.open_cursor(tid)
    if how == "skip_empty":
        call, stream = client.subscribe(cursor, interval_ms=50, skip_empty=True)
        written = set()
    else:
        call, stream = client.subscribe(cursor, interval_ms=50, window=1)
        next(stream)                                 # then neither read nor acknowledge
        written = {5, 6}
        target.write(buf + 5 * PAGE, 2)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3 * EXPIRY:
        assert cursor in cursor_ids(client, tid), f"expired while subscribed ({how})"
        time.sleep(EXPIRY / 4)
    call.cancel()                                    # the stream drops (a network blip)
    time.sleep(EXPIRY / 2)                           # reconnecting takes a moment
    target.write(buf + 9 * PAGE, 1)
    s = client.collect(cursor, after_seq=0)          # resume after the last acknowledged set
    assert s.seq == 1 and in_buf(s.pages(), buf, npages) == written | {9}
    client.stub.Detach(pb.DetachRequest(target_id=tid), timeout=10)


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_a_non_positive_expiry_is_refused_at_startup(tmp_path, value):
    """The janitor sleeps expiry / 4 between checks: 0 or less made it spin at 100 % CPU
    (and drop every cursor the moment it was opened)."""
    done = subprocess.run(
        [sys.executable, "-m", "dirtytrack", "serve", "--socket", str(tmp_path / "d.sock")],
        capture_output=True, text=True, timeout=20,
        env=dict(os.environ, PYTHONPATH=_pythonpath(), DIRTYTRACK_CONFIG="/dev/null",
                 DIRTYTRACK_CURSOR_IDLE_TIMEOUT_S=value))
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "cursor_idle_timeout_s" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "d.sock").exists()
