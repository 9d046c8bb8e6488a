"""Taking a userfaultfd from another running process: injected with ptrace,
or handed over on a Unix socket. The targets are real programs
(tests/inject_children/child.c, compiled here) that write pages and say which;
the tracker, working from outside on the fd we took, must report them all,
and the targets must not notice anything: no EINTR, no lost signal, no fd.
"""
from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from dirtytrack import Tracker, _core
from dirtytrack.errors import InjectionFailed, ProcessGone, PtraceDenied
from dirtytrack.handover import receive_userfaultfd

HERE = Path(__file__).parent
# The child imports the very dirtytrack this test imported (the installed
# package in CI, the in-place build in a checkout).
SERVICE = Path(_core.__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGESIZE")

pytestmark = [
    pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace injection needs root / CAP_SYS_PTRACE"),
]


@pytest.fixture(scope="module")
def child_exe(tmp_path_factory):
    out = tmp_path_factory.mktemp("children") / "child"
    subprocess.run(["cc", "-O2", "-Wall", "-pthread", "-o", str(out),
                    str(HERE / "inject_children" / "child.c")], check=True)
    return str(out)


class Child:
    """A running target with line I/O; every line it prints goes to a queue."""

    def __init__(self, argv):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     bufsize=0)
        self.pid = self.proc.pid
        self.lines: queue.Queue[str] = queue.Queue()
        self.eintr: list[str] = []
        self.usr1_acks = threading.Semaphore(0)
        self._start_reader()

    def _start_reader(self):
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        words = self.expect("buf").split()
        self.buf, self.npages = int(words[1]), int(words[2])

    def reap(self):
        """Wait for the exit, then close the pipes once the reader is done
        with them (closing under it could hand its fd number to a new pipe)."""
        self.proc.wait(timeout=5)
        self.reader.join(timeout=5)
        self.proc.stdout.close()
        if not self.proc.stdin.closed:
            self.proc.stdin.close()

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode().strip()
            if line.startswith("EINTR"):
                self.eintr.append(line)
            elif line == "u":
                self.usr1_acks.release()
            else:
                self.lines.put(line)

    def _state(self) -> str:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f)
            with open(f"/proc/{self.pid}/syscall") as f:
                sysc = f.read().strip()
            return (f"State {fields['State'].strip()}, TracerPid {fields['TracerPid'].strip()}, "
                    f"SigPnd {fields['SigPnd'].strip()}, ShdPnd {fields['ShdPnd'].strip()}, "
                    f"SigBlk {fields['SigBlk'].strip()}, syscall {sysc}, "
                    f"stack {Path(f'/proc/{self.pid}/stack').read_text()!r}, "
                    f"exe {os.readlink(f'/proc/{self.pid}/exe')}")
        except OSError as exc:
            return f"gone ({exc})"

    def send(self, text: str):
        self.proc.stdin.write(text.encode() + b"\n")

    def expect(self, prefix: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"child {self.pid} said no {prefix!r} line in {timeout}s; "
                                     f"state: {self._state()}") from None
            if line.startswith(prefix):
                return line

    def ask(self, command: str, prefix: str) -> list[int]:
        self.send(command)
        return [int(w) for w in self.expect(prefix).split()[1:]]

    def write_pages(self, pages) -> list[int]:
        """Have the child write these pages; returns the pages it says it wrote."""
        logged = []
        for page in pages:
            self.send(f"w {page}")
        for _ in pages:
            logged.append(int(self.expect("wrote").split()[1]))
        return logged

    def fds(self) -> set[str]:
        return set(os.listdir(f"/proc/{self.pid}/fd"))

    def close(self):
        if self.proc.poll() is None:
            try:
                self.send("q")
            except OSError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.reap()


@pytest.fixture
def spawn(child_exe):
    made = []

    def start(mode: str = "sleep") -> Child:
        c = Child([child_exe, mode])
        made.append(c)
        return c

    yield start
    for c in made:
        c.close()


def our_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def wait_for_syscall(pid: int, nr: int, timeout: float = 5.0):
    """Wait until pid's main thread sleeps in syscall nr (/proc/PID/syscall)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/syscall") as f:
            if f.read().split()[0] == str(nr):
                return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} never blocked in syscall {nr}")


def track_and_check(child: Child, fd: int, pages=(1, 7, 8, 9, 40, 63), busy=frozenset()):
    """Tracker over the child's buffer through fd: the pages it writes are
    reported, and a second collect is empty (re-protected) but for the
    `busy` pages its threads write all the time."""
    with Tracker(child.pid, uffd=fd) as t:
        region = t.add_range(child.buf, child.npages * PAGE)
        assert set(t.collect(region).pages()) <= busy
        logged = child.write_pages(pages)
        assert logged == list(pages)
        got = set(t.collect(region).pages())
        assert set(logged) <= got, f"missed pages {sorted(set(logged) - got)}"
        assert set(t.collect(region).pages()) <= busy
    return got


# -- ptrace injection ------------------------------------------------------------
def test_inject_into_nanosleep_loop(spawn):
    child = spawn("sleep")
    mine, theirs = our_fds(), child.fds()
    loops_before = child.ask("t", "loops")[0]
    for _ in range(25):                       # each one interrupts a sleep
        inj = _core.inject_userfaultfd(child.pid)
        assert inj.pid == child.pid and inj.tid == child.pid
        assert os.readlink(f"/proc/self/fd/{inj.fd}") == "anon_inode:[userfaultfd]"
        assert child.fds() == theirs, "the target kept an extra fd"
        assert inj.stopped_ns > 0 and inj.total_ns >= inj.stopped_ns
        os.close(inj.fd)
    inj = _core.inject_userfaultfd(child.pid)
    got = track_and_check(child, inj.fd)
    assert got == {1, 7, 8, 9, 40, 63}        # nothing else was written
    time.sleep(0.05)
    assert child.ask("t", "loops")[0] > loops_before + 10, "its sleep loop stopped"
    assert child.eintr == [], "the target saw EINTR"
    assert our_fds() == mine, "fd leak in the tracker"
    assert child.fds() == theirs


def test_inject_into_blocked_pipe_read(spawn):
    child = spawn("pipe")
    wait_for_syscall(child.pid, 0)            # read(0, ...)
    mine, theirs = our_fds(), child.fds()
    inj = _core.inject_userfaultfd(child.pid)
    assert inj.interrupted_syscall == 0
    assert child.fds() == theirs
    wait_for_syscall(child.pid, 0)            # back in read(), restarted
    # The restarted read gets the data as if nothing happened.
    track_and_check(child, inj.fd, pages=(0, 2, 33))
    assert child.eintr == []
    assert our_fds() == mine


def test_inject_multithreaded_writers(spawn):
    child = spawn("threads")
    mine, theirs = our_fds(), child.fds()
    while min(child.ask("c", "workers")) == 0:     # every worker is in its loop
        time.sleep(0.001)
    workers = [int(t) for t in os.listdir(f"/proc/{child.pid}/task") if int(t) != child.pid]
    assert len(workers) == 3
    # A thread spinning in user code (not in a syscall) works too.
    inj = _core.inject_userfaultfd(child.pid, tid=workers[0])
    assert inj.tid == workers[0] and inj.interrupted_syscall == -1
    os.close(inj.fd)
    inj = _core.inject_userfaultfd(child.pid)
    before = child.ask("c", "workers")
    track_and_check(child, inj.fd, pages=(10, 20, 30), busy={0, 1, 2})
    inj = _core.inject_userfaultfd(child.pid)
    with Tracker(child.pid, uffd=inj.fd) as t:   # the workers' own pages, as they write
        region = t.add_range(child.buf, child.npages * PAGE)
        seen: set[int] = set()
        deadline = time.monotonic() + 5
        while not {0, 1, 2} <= seen and time.monotonic() < deadline:
            time.sleep(0.01)
            seen |= set(t.collect(region).pages())
        assert seen == {0, 1, 2}
    after = child.ask("c", "workers")
    assert all(a > b for a, b in zip(after, before)), "a worker thread stopped"
    assert child.fds() == theirs and child.eintr == []
    assert our_fds() == mine


def test_signals_during_injection_are_all_delivered(spawn):
    child = spawn("signals")
    mine = our_fds()
    rtmin = signal.SIGRTMIN
    n_rt, n_usr1 = 400, 60
    stop = threading.Event()

    def rt_sender():                          # queued signals: none may be lost
        for _ in range(n_rt):
            os.kill(child.pid, rtmin)
            time.sleep(0.0002)

    def usr1_sender():                        # one at a time, each acknowledged
        for _ in range(n_usr1):
            os.kill(child.pid, signal.SIGUSR1)
            assert child.usr1_acks.acquire(timeout=5), "a SIGUSR1 was lost"

    senders = [threading.Thread(target=rt_sender), threading.Thread(target=usr1_sender)]
    for s in senders:
        s.start()
    injections = 0
    while any(s.is_alive() for s in senders) and not stop.is_set():
        inj = _core.inject_userfaultfd(child.pid)
        os.close(inj.fd)
        injections += 1
    for s in senders:
        s.join()
    assert injections > 5
    deadline = time.monotonic() + 5
    while child.ask("n", "count") != [n_usr1, n_rt] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert child.ask("n", "count") == [n_usr1, n_rt]
    inj = _core.inject_userfaultfd(child.pid)
    track_and_check(child, inj.fd, pages=(3, 4))
    assert our_fds() == mine


@pytest.mark.parametrize("stage", ["stopped", "injected"])
def test_target_killed_during_injection(spawn, stage):
    child = spawn("sleep")
    mine = our_fds()

    def hook(at, tid):
        if at == stage:
            os.kill(child.pid, signal.SIGKILL)
            time.sleep(0.05)

    with pytest.raises(ProcessGone, match=f"process {child.pid} exited"):
        _core.inject_userfaultfd(child.pid, _stage_hook=hook)
    assert our_fds() == mine
    # Its exit is left to its parent (us), not reaped by the injector.
    assert child.proc.wait(timeout=5) == -signal.SIGKILL


def test_target_exiting_by_itself_during_attaches(child_exe):
    """A target that exits on its own while we attach again and again: each
    attach either works or raises ProcessGone, and nothing leaks."""
    mine = our_fds()
    outcomes = {"ok": 0, "gone": 0}
    for _ in range(5):
        child = Child([child_exe, "sleep"])
        child.proc.stdin.close()              # read() returns 0: it exits at once
        while True:
            try:
                inj = _core.inject_userfaultfd(child.pid)
            except ProcessGone:
                outcomes["gone"] += 1
                break
            os.close(inj.fd)
            outcomes["ok"] += 1
        child.reap()
    assert outcomes["gone"] == 5
    assert our_fds() == mine


def test_group_stopped_target_stays_stopped(spawn):
    child = spawn("sleep")
    os.kill(child.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while _core._thread_state(child.pid, child.pid) != "T" and time.monotonic() < deadline:
        time.sleep(0.001)
    inj = _core.inject_userfaultfd(child.pid)
    time.sleep(0.05)
    assert _core._thread_state(child.pid, child.pid) == "T", "SIGSTOP'd target was resumed"
    os.kill(child.pid, signal.SIGCONT)
    track_and_check(child, inj.fd, pages=(5,))
    assert child.eintr == []


def test_errors_name_the_cause(spawn):
    with pytest.raises(ProcessGone):
        _core.inject_userfaultfd(2 ** 22 + 12345)
    child = spawn("sleep")
    # Already traced by another process: say who.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import ctypes, sys, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"assert libc.ptrace(0x4206, {child.pid}, 0, 0) == 0\n"
        "print('seized', flush=True)\n"
        "time.sleep(30)\n")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"seized"
        mine = our_fds()
        with pytest.raises(PtraceDenied, match=f"already traced by process {holder.pid}"):
            _core.inject_userfaultfd(child.pid)
        assert our_fds() == mine
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    # Ourselves: ptrace cannot attach to its own thread group.
    with pytest.raises((PtraceDenied, InjectionFailed)):
        _core.inject_userfaultfd(os.getpid())


def test_pidfd_wrappers(spawn):
    child = spawn("sleep")
    pidfd = _core.pidfd_open(child.pid)
    try:
        fd = _core.pidfd_getfd(pidfd, 1)          # its stdout pipe
        assert os.path.samestat(os.fstat(fd), os.fstat(child.proc.stdout.fileno()))
        assert os.get_inheritable(fd) is False
        os.close(fd)
        with pytest.raises(OSError):
            _core.pidfd_getfd(pidfd, 999)
    finally:
        os.close(pidfd)


# -- cooperative hand-over ----------------------------------------------------------
SENDER_PY = r"""
import mmap, socket, sys
from dirtytrack.handover import send_userfaultfd
npages = 16
m = mmap.mmap(-1, npages * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
import ctypes
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
send_userfaultfd(s)
print("buf", addr, npages, flush=True)
for line in sys.stdin:
    page = int(line.split()[1])
    m[page * mmap.PAGESIZE] = 1
    print("wrote", page, flush=True)
"""

SENDER_C_MAIN = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/un.h>
int main(int argc, char **argv)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    char line[64];
    long page;
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    char *buf = mmap(NULL, 16 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    strncpy(sa.sun_path, argv[1], sizeof(sa.sun_path) - 1);
    if (connect(s, (struct sockaddr *)&sa, sizeof(sa)) || dirtytrack_send_uffd(s))
        return 1;
    printf("buf %ld 16\n", (long)buf);
    fflush(stdout);
    while (fgets(line, sizeof(line), stdin) && sscanf(line, "w %ld", &page) == 1) {
        buf[page * 4096] = 1;
        printf("wrote %ld\n", page);
        fflush(stdout);
    }
    return 0;
}
"""


def _c_sender(tmp_path) -> str:
    """docs/handover.md's C recipe, compiled with a main() around it."""
    doc = (HERE.parent / "docs" / "handover.md").read_text()
    recipe = re.search(r"```c\n(.*?)```", doc, re.S).group(1)
    src = tmp_path / "sender.c"
    src.write_text(recipe + SENDER_C_MAIN)
    exe = tmp_path / "sender"
    subprocess.run(["cc", "-O2", "-Wall", "-o", str(exe), str(src)], check=True)
    return str(exe)


@pytest.mark.parametrize("language", ["python", "c"])
def test_handover_over_unix_socket(tmp_path, language):
    path = str(tmp_path / "uffd.sock")
    mine = our_fds()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    if language == "python":
        env = dict(os.environ, PYTHONPATH=str(SERVICE))
        argv = [sys.executable, "-c", SENDER_PY, path]
    else:
        env, argv = None, [_c_sender(tmp_path), path]
    child = Child.__new__(Child)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                            env=env)
    try:
        conn, _ = listener.accept()
        with conn:
            fd, pid = receive_userfaultfd(conn)
        assert pid == proc.pid
        assert os.get_inheritable(fd) is False
        child.proc, child.pid = proc, proc.pid
        child.lines, child.eintr, child.usr1_acks = queue.Queue(), [], threading.Semaphore(0)
        child._start_reader()
        assert "anon_inode:[userfaultfd]" not in {
            os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
        track_and_check(child, fd, pages=(0, 5, 15))
    finally:
        proc.stdin.close()
        if hasattr(child, "reader"):
            child.reap()
        else:
            proc.wait(timeout=10)
            proc.stdout.close()
        listener.close()
    assert our_fds() == mine


def test_unprivileged_target_gets_user_mode_only(child_exe, tmp_path_factory):
    """vm.unprivileged_userfaultfd=0 and a target without CAP_SYS_PTRACE: the
    plain syscall is EPERM inside it, the injection retries user-mode-only."""
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        if f.read().strip() != "0":
            pytest.skip("vm.unprivileged_userfaultfd is not 0 here")
    shared = Path(tempfile.mkdtemp(prefix="dt-inject-"))
    try:
        shared.chmod(0o755)
        exe = shared / "child"
        shutil.copy(child_exe, exe)
        exe.chmod(0o755)
        mine = our_fds()
        child = Child.__new__(Child)
        child.proc = subprocess.Popen([str(exe), "sleep"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, bufsize=0, user=65534, group=65534)
        child.pid = child.proc.pid
        child.lines, child.eintr, child.usr1_acks = queue.Queue(), [], threading.Semaphore(0)
        child._start_reader()
        try:
            inj = _core.inject_userfaultfd(child.pid)
            assert inj.user_mode_only is True
            track_and_check(child, inj.fd, pages=(2, 3))
            assert child.eintr == []
        finally:
            child.close()
        assert our_fds() == mine
    finally:
        shutil.rmtree(shared)
