"""attach(pid): tracking a real process we did not write, against ground truth.

The target (workloads/target.c) writes exactly what the test tells it and
answers when done, so every expectation is what really happened.
"""
import os
import signal
import time

import pytest

import dirtytrack
from dirtytrack import InvalidRange, ProcessGone
from workloads.target import PAGE

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="attaching with ptrace needs root "
                                "(CAP_SYS_PTRACE)")



def our_fds():
    return set(os.listdir("/proc/self/fd"))


def mapping_at(report, addr):
    found = [m for m in report.mappings if m.start <= addr < m.end and m.status != "removed"]
    assert found, f"no tracked mapping holds {addr:#x}: {report.mappings}"
    return found[0]


def test_writes_of_an_unmodified_process_are_reported_exactly(target):
    t = target()
    buf = t.map(256)
    with dirtytrack.attach(t.pid) as tracker:
        assert any(m["start"] <= buf < m["end"] for m in tracker.mappings())
        for round_no, pages in enumerate([[0], [1, 2, 3], [255], [], list(range(0, 256, 5))]):
            for p in pages:
                t.write(buf + p * PAGE, 1, round_no)
            report = tracker.collect()
            assert not report.full_resync, report.reasons
            m = mapping_at(report, buf)
            got = {a for a in report.pages() if buf <= a < buf + 256 * PAGE}
            assert got == {buf + p * PAGE for p in pages}, f"round {round_no}"
            assert m.status == "tracking"


def test_concurrent_writer_in_target_is_never_missed(target):
    """A thread in the target writes random pages while we collect; its log
    (with collect windows) is checked page by page."""
    t = target()
    npages = 2048
    buf = t.map(npages)
    with dirtytrack.attach(t.pid) as tracker:
        t.start_writer(buf, npages)
        reports = []
        deadline = time.monotonic() + 10
        while len(reports) < 100 and time.monotonic() < deadline:
            reports.append(t.collect_with_window(tracker.collect))
            time.sleep(0.002)
        log = t.stop_writer()
        reports.append(t.collect_with_window(tracker.collect))
    assert len(log) > 10000, "the writer made too little progress to prove anything"
    assert all(first <= last for _, first, last in log), "harness: a write's window is inverted"
    # The buffer is never lost. (Other mappings may be: the writer's log grows
    # by realloc, whose mremap can move a region between our maps check and
    # its scan; that is reported lost, honestly, and is not what is tested.)
    for r in reports:
        assert mapping_at(r, buf).status == "tracking", r.reasons
    collected = [{(a - buf) // PAGE for a in r.pages() if buf <= a < buf + npages * PAGE}
                 for r in reports]
    missed = [(page, first, last) for page, first, last in log
              if not any(page in collected[n] for n in range(first, min(last, len(collected) - 1) + 1))]
    assert missed == [], f"{len(missed)} of {len(log)} writes missed, e.g. {missed[:5]}"


def test_new_mapping_is_reported_whole_then_tracked(target):
    t = target()
    t.map(4)
    with dirtytrack.attach(t.pid) as tracker:
        tracker.collect()
        fresh = t.map(32)
        report = tracker.collect()
        m = mapping_at(report, fresh)
        assert m.status == "new" and m.count == 32 and (m.start, m.end) == (fresh, fresh + 32 * PAGE)
        t.write(fresh + 5 * PAGE)
        m = mapping_at(tracker.collect(), fresh)
        assert m.status == "tracking" and m.ranges() == [(fresh + 5 * PAGE, fresh + 6 * PAGE)]


def test_munmap_is_reported_removed(target):
    t = target()
    buf = t.map(16)
    with dirtytrack.attach(t.pid) as tracker:
        tracker.collect()
        t.cmd(f"unmap {buf} 16")
        report = tracker.collect()
        removed = [m for m in report.removed if m.start == buf]
        assert removed and removed[0].dirty is None
        assert not any(m["start"] <= buf < m["end"] for m in tracker.mappings())


def test_partial_munmap_keeps_the_rest_as_new(target):
    t = target()
    buf = t.map(16)
    with dirtytrack.attach(t.pid) as tracker:
        tracker.collect()
        t.cmd(f"unmap {buf + 4 * PAGE} 4")
        report = tracker.collect()
        assert any(m.status == "removed" and m.start == buf for m in report.mappings)
        covered = set()
        for m in report.mappings:
            if m.status == "new" and buf <= m.start < buf + 16 * PAGE:
                covered |= {a for lo, hi in m.ranges() for a in range(lo, hi, PAGE)}
        assert covered == t.pages(buf, 4) | t.pages(buf + 8 * PAGE, 8)


def test_mremap_move_is_removed_plus_new(target):
    t = target()
    buf = t.map(8)
    t.map(1)                                  # block growth in place: force a move
    with dirtytrack.attach(t.pid) as tracker:
        tracker.collect()
        moved = int(t.cmd(f"remap {buf} 8 64")[1])
        assert moved != buf
        report = tracker.collect()
        assert any(m.status == "removed" and m.start == buf for m in report.mappings)
        m = mapping_at(report, moved)
        assert m.status in ("new", "lost") and m.count == (m.end - m.start) // PAGE
        t.write(moved + 63 * PAGE)
        report = tracker.collect()
        assert {a for a in report.pages() if moved <= a < moved + 64 * PAGE} == {moved + 63 * PAGE}


def test_mremap_grow_in_place_tracks_the_growth(target):
    t = target()
    buf = t.map(8)
    with dirtytrack.attach(t.pid) as tracker:
        tracker.collect()
        t.write(buf)
        grown = int(t.cmd(f"remap {buf} 8 16")[1])
        report = tracker.collect()
        pages = {a for a in report.pages() if grown <= a < grown + 16 * PAGE}
        assert grown + 0 in pages or buf in pages      # the write, wherever it now lives
        if grown == buf:
            # The old part kept its tracking; the growth is new.
            assert t.pages(buf + 8 * PAGE, 8) <= pages


def test_dontneed_in_target_is_reported(target):
    t = target()
    buf = t.map(8)
    t.write(buf, 8)
    with dirtytrack.attach(t.pid) as tracker:
        tracker.collect()
        t.cmd(f"dontneed {buf + 2 * PAGE} 2")
        report = tracker.collect()
        assert {a for a in report.pages() if buf <= a < buf + 8 * PAGE} == t.pages(buf + 2 * PAGE, 2)


def test_mprotect_round_trip_keeps_tracking(target):
    t = target()
    buf = t.map(8)
    with dirtytrack.attach(t.pid) as tracker:
        tracker.collect()
        t.cmd(f"protect {buf} 8 0")
        report = tracker.collect()
        assert not report.removed and not report.full_resync
        t.cmd(f"protect {buf} 8 3")
        t.write(buf + 3 * PAGE)
        report = tracker.collect()
        assert {a for a in report.pages() if buf <= a < buf + 8 * PAGE} == {buf + 3 * PAGE}


def test_exec_is_a_full_resync_and_tracking_goes_on(target):
    t = target()
    t.map(8)
    with dirtytrack.attach(t.pid) as tracker:
        tracker.collect()
        t.proc.stdin.write("exec\n")
        t.proc.stdin.flush()
        assert t.proc.stdout.readline().split()[0] == "ready"
        report = tracker.collect()
        assert report.full_resync and any("exec" in r for r in report.reasons)
        assert report.removed and not report.exited
        buf = t.map(8)
        tracker.collect()                      # the new mapping, reported new
        t.write(buf + PAGE)
        report = tracker.collect()
        assert {a for a in report.pages() if buf <= a < buf + 8 * PAGE} == {buf + PAGE}


def test_target_exit_ends_with_a_final_report_and_no_leaks(target):
    t = target()
    t.map(8)
    before = our_fds()
    tracker = dirtytrack.attach(t.pid)
    tracker.collect()
    t.proc.stdin.write("exit\n")
    t.proc.stdin.flush()
    t.proc.wait()
    report = tracker.collect()
    assert report.exited and report.full_resync and report.removed
    assert tracker.collect() is report          # stays final
    tracker.close()
    assert our_fds() == before


def test_target_killed_while_collecting(target):
    t = target()
    buf = t.map(4096)
    t.write(buf, 4096)
    t.start_writer(buf, 4096)       # (its shared page is mapped here: one fd of ours)
    before = our_fds()
    tracker = dirtytrack.attach(t.pid)
    os.kill(t.pid, signal.SIGKILL)
    # Collect until the exit shows (the kernel tears the process down in its
    # own time; a fixed number of collects races with how fast they are).
    reports = [tracker.collect()]
    deadline = time.monotonic() + 10
    while not reports[-1].exited and time.monotonic() < deadline:
        reports.append(tracker.collect())
    assert reports[-1].exited
    tracker.close()
    assert our_fds() == before


def test_refusals_name_the_cause(target):
    with pytest.raises(ProcessGone, match="no process"):
        dirtytrack.attach(2 ** 22 + 12345)
    with pytest.raises(InvalidRange, match="kernel thread"):
        dirtytrack.attach(2)                   # kthreadd
    with pytest.raises(InvalidRange):
        dirtytrack.attach(0)
    t = target()
    t.proc.stdin.write("exit\n")
    t.proc.stdin.flush()
    time.sleep(0.2)                            # exited, not reaped: a zombie
    with pytest.raises(ProcessGone, match="zombie|exited"):
        dirtytrack.attach(t.pid)


def test_skipped_mappings_say_why(target):
    t = target()
    with dirtytrack.attach(t.pid) as tracker:
        skipped = tracker.skipped()
        assert any(s["name"] == "[vdso]" and "special" in s["reason"] for s in skipped)
        assert any("private file mapping" in s["reason"] for s in skipped)
        assert all(s["reason"] for s in skipped)


def test_selection_by_range_tracks_only_that(target):
    t = target()
    a = t.map(16)
    b = t.map(16)
    with dirtytrack.attach(t.pid, default=False, ranges=[(a + 4 * PAGE, a + 8 * PAGE)]) as tracker:
        assert [(m["start"], m["end"]) for m in tracker.mappings()] == [(a + 4 * PAGE, a + 8 * PAGE)]
        t.write(a, 16)
        t.write(b, 16)
        assert tracker.collect().pages() == t.pages(a + 4 * PAGE, 4)


def test_self_attach_uses_our_own_userfaultfd():
    import kmem
    addr = kmem.mmap(8 * PAGE)
    try:
        with dirtytrack.attach(os.getpid(), default=False, ranges=[(addr, addr + 8 * PAGE)]) as tr:
            kmem.write_page(addr + 2 * PAGE)
            assert tr.collect().pages() == {addr + 2 * PAGE}
    finally:
        kmem.munmap(addr, 8 * PAGE)


def test_shared_memfd_union_over_all_mappers(target):
    """Two processes map one memfd (a VMM and a vhost-user back-end): writes
    from either are reported, by file page."""
    vmm, backend = target(), target()
    addr_a, fd = vmm.map_shared(64)
    path = f"/proc/{vmm.pid}/fd/{fd}"
    # The back-end opens the same memfd (as SCM_RIGHTS would give it) and maps it.
    addr_b = int(backend.cmd(f"mapfd {int(backend.cmd(f'open {path}')[1])} 64")[1])
    with dirtytrack.track_shared(path) as shared:
        assert sorted(shared.pids) == sorted([vmm.pid, backend.pid])
        assert shared.collect().pages() == []
        vmm.write(addr_a + 3 * PAGE)
        backend.write(addr_b + 40 * PAGE, 2)
        d = shared.collect()
        assert d.pages() == [3, 40, 41] and not d.full_resync
        # a third mapper appears: its whole mapping is reported, then tracked
        late = target()
        addr_c = int(late.cmd(f"mapfd {int(late.cmd(f'open {path}')[1])} 64")[1])
        d = shared.collect()
        assert late.pid in d.pids and d.pages() == list(range(64))
        late.write(addr_c + 9 * PAGE)
        assert shared.collect().pages() == [9]



def test_attach_and_detach_leave_a_blocked_target_working(target):
    """The target sits in read() between commands: twenty attach/collect/close
    cycles later its read still returns our commands normally, and what it
    wrote meanwhile is intact."""
    t = target()
    buf = t.map(4)
    for i in range(20):
        with dirtytrack.attach(t.pid) as tracker:
            t.write(buf + (i % 4) * PAGE, 1, i)
            assert buf + (i % 4) * PAGE in tracker.collect().pages()
        # after close the target is untracked and undisturbed
        t.write(buf, 4, i)
    with open(f"/proc/{t.pid}/mem", "rb") as mem:
        mem.seek(buf + 7)
        assert mem.read(1) == bytes([19])
    assert t.proc.poll() is None


COOPERATIVE_CHILD = r"""
import mmap, socket, sys, ctypes
from dirtytrack.handover import send_userfaultfd
m = mmap.mmap(-1, 16 * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
send_userfaultfd(s)
print(addr, flush=True)
for line in sys.stdin:
    m[int(line) * mmap.PAGESIZE] = 1
    print("ok", flush=True)
"""


def test_cooperative_attach_with_a_handed_over_userfaultfd(tmp_path):
    """No ptrace: the process sends its own userfaultfd (SCM_RIGHTS)."""
    import socket
    import subprocess
    import sys
    from dirtytrack.handover import receive_userfaultfd
    from dirtytrack import _core
    path = str(tmp_path / "handover.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(_core.__file__)))
    child = subprocess.Popen([sys.executable, "-c", COOPERATIVE_CHILD, path], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    try:
        conn, _ = listener.accept()
        fd, pid = receive_userfaultfd(conn)
        conn.close()
        assert pid == child.pid
        addr = int(child.stdout.readline())
        with dirtytrack.attach(pid, uffd=fd, default=False,
                               ranges=[(addr, addr + 16 * PAGE)]) as tracker:
            for page in (3, 9):
                child.stdin.write(f"{page}\n")
                child.stdin.flush()
                assert child.stdout.readline().strip() == "ok"
            assert tracker.collect().pages() == {addr + 3 * PAGE, addr + 9 * PAGE}
    finally:
        listener.close()
        child.kill()
        child.wait()


def test_selection_by_name_pattern(target):
    t = target()
    anon = t.map(8)
    shm, _ = t.map_shared(8)
    with dirtytrack.attach(t.pid, default=False, names=["/memfd:dirtytrack-test*"]) as tracker:
        assert [(m["start"], m["kind"]) for m in tracker.mappings()] == [(shm, "shmem")]
        t.write(anon, 8)
        t.write(shm + 2 * PAGE)
        assert tracker.collect().pages() == {shm + 2 * PAGE}


def test_exec_we_cannot_follow_ends_tracking_honestly(target):
    """After exec the new program is under a seccomp filter, so injection is
    refused: the report is a full resync that says tracking ended, and stays so."""
    t = target()
    t.map(8)
    with dirtytrack.attach(t.pid) as tracker:
        tracker.collect()
        t.cmd("seccomp")
        t.proc.stdin.write("exec\n")
        t.proc.stdin.flush()
        assert t.proc.stdout.readline().split()[0] == "ready"
        report = tracker.collect()
        assert report.full_resync and not report.exited and tracker.ended
        assert report.events[0][0] == "exec" and "tracking ended" in report.reasons[0]
        assert "seccomp" in report.reasons[0]
        assert tracker.collect() is report
