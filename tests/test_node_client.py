"""A client in another language: tests/node/client.js (grpc-js + proto-loader, built
from the .proto alone) against a real daemon on its unix socket, compared page by
page with what the C target wrote.

Needs `node` (skipped, saying so, only when it is absent) and tests/node/node_modules
(`npm ci` in tests/node; .ci/run does it).
"""
from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time

import pytest

from daemon_support import Daemon
from dirtytrack.daemon.client import Client
from dirtytrack.v1 import dirtytrack_pb2 as pb
from workloads.target import PAGE

NODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node")
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed: the JavaScript client "
                       "interop test needs Node.js (>= 18) and `npm ci` in tests/node"),
    pytest.mark.skipif(os.geteuid() != 0, reason="attaching needs root (ptrace)"),
]


@pytest.fixture(scope="module")
def daemon():
    if not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "@grpc", "grpc-js")):
        pytest.fail("tests/node/node_modules is missing: run `npm ci` in tests/node "
                    "(.ci/run does) before the tests")
    d = Daemon()
    yield d
    d.close()


@pytest.fixture
def target(target):
    """One target process (conftest's factory, used once)."""
    return target()


class NodeClient:
    def __init__(self, address: str, what: str):
        self.proc = subprocess.Popen([NODE, os.path.join(NODE_DIR, "client.js"), address, what],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)

    def read(self, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    raise AssertionError(f"node exited {self.proc.wait()}: "
                                         f"{self.proc.stderr.read()}")
                msg = json.loads(line)
                assert msg["event"] != "error", msg
                return msg
            if left <= 0:
                raise AssertionError("node client did not answer in time")

    def collect(self, after_seq: int) -> dict:
        self.proc.stdin.write(f"collect {after_seq}\n")
        self.proc.stdin.flush()
        s = self.read()
        assert s["event"] == "set" and s["problems"] == [], s
        return s

    def quit(self) -> int:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        try:
            return self.proc.wait(20)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            f.close()


def pages_in(s: dict, buf: int, npages: int) -> set[int]:
    """Page indexes of [buf, buf + npages pages) the node client decoded as dirty."""
    end = buf + npages * PAGE
    out = set()
    for m in s["mappings"]:
        for lo, hi in m["ranges"]:
            for a in range(int(lo), int(hi), s["page_size"]):
                if buf <= a < end:
                    out.add((a - buf) // PAGE)
    return out


def forms_in(s: dict, buf: int, npages: int) -> set[str]:
    end = buf + npages * PAGE
    return {m["form"] for m in s["mappings"]
            if int(m["start"]) < end and int(m["end"]) > buf and m["ranges"]}


def check_consistent(s: dict) -> None:
    """Within each piece: ranges inside the mapping, counts as the daemon says."""
    total = 0
    for m in s["mappings"]:
        start, end = int(m["start"]), int(m["end"])
        for lo, hi in m["ranges"]:
            assert start <= int(lo) < int(hi) <= end, m
        assert m["decoded_pages"] == m["dirty_pages"], m
        total += int(m["decoded_pages"])
    assert int(s["set_dirty_pages"]) == total, s


def test_node_client_attaches_collects_and_decodes_like_the_ground_truth(daemon, target):
    t = target
    npages = 1024
    buf = t.map(npages)
    node = NodeClient(daemon.address, str(t.pid))
    try:
        ready = node.read()
        assert ready["health"] == {"": "SERVING", "dirtytrack.v1.DirtyTracker": "SERVING"}
        assert ready["attached"] is True and ready["page_size"] == PAGE
        assert ready["target_id"].startswith("tgt-") and ready["cursor_id"].startswith("cur-")

        s1 = node.collect(0)
        assert s1["seq"] == "1" and not s1["full_resync"], s1
        assert pages_in(s1, buf, npages) == set()          # nothing written in buf yet

        # A few runs: the daemon sends `runs` (varint gap/length pairs).
        written = set(range(3, 8)) | {100} | set(range(500, 564))
        t.write(buf + 3 * PAGE, 5)
        t.write(buf + 100 * PAGE, 1)
        t.write(buf + 500 * PAGE, 64)
        s2 = node.collect(1)
        assert s2["seq"] == "2" and not s2["full_resync"], s2
        assert pages_in(s2, buf, npages) == written
        assert forms_in(s2, buf, npages) == {"runs"}, s2
        check_consistent(s2)

        # Every other page: a bitmap is smaller than 512 runs.
        written = set(range(0, npages, 2))
        for p in sorted(written):
            t.write(buf + p * PAGE, 1, seed=p)
        s3 = node.collect(2)
        assert s3["seq"] == "3" and not s3["full_resync"]
        assert pages_in(s3, buf, npages) == written
        assert forms_in(s3, buf, npages) == {"bitmap"}, s3
        check_consistent(s3)

        # The answer was "lost": asking again after 2 gets set 3 again, plus anything newer.
        t.write(buf + 1 * PAGE, 1)
        again = node.collect(2)
        assert again["seq"] == "3"
        assert pages_in(again, buf, npages) == written | {1}
        check_consistent(again)
        cursor = ready["cursor_id"]
        assert node.quit() == 0
    finally:
        node.close()
    with Client(daemon.address) as c:                  # the node client closed its cursor
        info = c.describe(ready["target_id"])
        assert cursor not in {x.cursor_id for x in info.cursors}
        c.stub.Detach(pb.DetachRequest(target_id=ready["target_id"]), timeout=10)


def test_node_client_uses_a_target_attached_by_another_client(daemon, target):
    t = target
    buf = t.map(64)
    with Client(daemon.address) as c:
        tid = c.attach(t.pid).target.target_id
        node = NodeClient(daemon.address, tid)
        try:
            ready = node.read()
            assert ready["target_id"] == tid and ready["attached"] is False
            node.collect(0)
            t.write(buf + 10 * PAGE, 3)
            s = node.collect(1)
            assert s["target_id"] == tid and s["seq"] == "2"
            assert pages_in(s, buf, 64) == {10, 11, 12}
            check_consistent(s)
            assert node.quit() == 0
        finally:
            node.close()
        assert [x.cursor_id for x in c.describe(tid).cursors] == []


def test_node_client_gets_an_actionable_status(daemon):
    """A bad target id: the status code and message reach JavaScript intact."""
    node = NodeClient(daemon.address, "tgt-000000000000-1")
    try:
        line = node.proc.stdout.readline()
        assert node.proc.wait(20) == 1
        err = json.loads(line)
        assert err["event"] == "error" and err["rpc"] == "OpenCursor", err
        assert err["code"] == "FAILED_PRECONDITION" and "earlier run of the daemon" in \
            err["details"], err
    finally:
        node.close()
