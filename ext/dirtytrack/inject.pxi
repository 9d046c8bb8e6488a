# inject.pxi - a userfaultfd that belongs to another running process.
#
# Only userfaultfd() itself must run in the target (the uffd context takes the
# mm of its caller); everything after - UFFDIO_API, REGISTER, WRITEPROTECT,
# PAGEMAP_SCAN - works from outside on a duplicate of the fd. So:
#
#   PTRACE_SEIZE one thread, PTRACE_INTERRUPT it, save its registers and
#   signal mask, block every signal, point it at a `syscall` instruction that
#   is already in its text (the vdso's), single-step userfaultfd(), take the
#   new fd with pidfd_getfd(), single-step close() on it, restore registers
#   and mask, PTRACE_DETACH.
#
# Why the thread notices nothing: the kernel decides whether to restart an
# interrupted syscall (-ERESTARTSYS & co. in rax) *after* the ptrace stop, from
# whatever registers it finds then (arch_do_signal_or_restart). Our injected
# steps carry orig_rax = -1 (no restart); the restored registers carry the
# original syscall and -ERESTART*, so it restarts as if nothing happened.
# Signals: blocked (PTRACE_SETSIGMASK) while we hold the thread, so they wait
# pending and are delivered normally after detach; a signal already being
# delivered when we stop it is let through (PTRACE_CONT with it) first; the
# only ones that can still show up mid-injection (SIGSTOP, unblockable) are
# kept with their siginfo and handed back on detach. None is ever dropped.

from libc.errno cimport ECHILD, EINTR, ESRCH
from libc.stdio cimport snprintf
from libc.string cimport strcmp
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from posix.unistd cimport readlink

import collections

cdef enum:
    SI_SYS_SECCOMP = 1            # si_code of SIGSYS from a seccomp RET_TRAP
    MAX_KEPT_SIGNALS = 8
    MAX_STOPS_PER_STEP = 32
    # Our own error codes (negative: never an errno).
    E_SECCOMP_TRAP = -1           # SIGSYS: a seccomp filter trapped the syscall
    E_FAULT_SIGNAL = -2           # the step raised SIGSEGV/SIGILL/...: not a syscall insn
    E_NOT_NATIVE = -3             # the thread is a 32-bit (ia32) task

cdef extern from *:
    """
    #define DT_SIGSET_ALL (~(unsigned long long)0)
    """
    unsigned long long DT_SIGSET_ALL


Injected = collections.namedtuple("Injected", [
    "fd",                   # the userfaultfd, in this process (O_CLOEXEC, O_NONBLOCK)
    "pid",                  # the process it belongs to
    "tid",                  # the thread that ran userfaultfd()
    "stopped_ns",           # PTRACE_INTERRUPT -> PTRACE_DETACH: the thread's stop, bounded above
    "total_ns",             # the whole call, checks included
    "user_mode_only",       # True if the target needed UFFD_USER_MODE_ONLY
    "interrupted_syscall",  # syscall number the thread was stopped in, -1 if in user code
    "signals_redelivered",  # signals that arrived mid-injection and were handed back
])


# -- pidfd ------------------------------------------------------------------
def pidfd_open(int pid, unsigned int flags=0):
    """pidfd_open(2): an fd that names process `pid` (Linux 5.3). O_CLOEXEC."""
    cdef long fd
    with nogil:
        fd = syscall(SYS_pidfd_open, pid, flags)
    if fd < 0:
        e = errno
        raise OSError(e, f"pidfd_open({pid}): {os.strerror(e)}")
    return fd


def pidfd_getfd(int pidfd, int targetfd, unsigned int flags=0):
    """pidfd_getfd(2): a duplicate, in this process, of fd `targetfd` of the
    process `pidfd` names (Linux 5.6; needs ptrace attach rights). O_CLOEXEC."""
    cdef long fd
    with nogil:
        fd = syscall(SYS_pidfd_getfd, pidfd, targetfd, flags)
    if fd < 0:
        e = errno
        raise OSError(e, f"pidfd_getfd({targetfd}): {os.strerror(e)}")
    return fd


# -- the stopped thread -------------------------------------------------------
cdef inline uint64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec


cdef inline long pt(long request, int tid, uintptr_t addr, uintptr_t data) noexcept nogil:
    return syscall(SYS_ptrace, request, tid, addr, data)


cdef struct Tracee:
    int pid
    int tid
    bint leave_exit_to_parent   # we are also the real parent of tid == pid: don't reap it
    bint seized
    bint in_signal_stop         # stopped in a signal-delivery-stop (DETACH can inject then)
    bint have_regs
    bint have_mask
    dt_regs saved
    uint64_t saved_mask
    uint64_t insn               # address of a syscall instruction in the target
    int nkept
    siginfo_t kept[MAX_KEPT_SIGNALS]
    int nlost_kept              # kept signals beyond the array: resent by tgkill
    int lost_signo[MAX_KEPT_SIGNALS]


cdef int wait_stop(Tracee *t, int *status) noexcept nogil:
    """Wait for the next state change of the tracee. 0 if it stopped
    (*status set), ESRCH if it exited - reaped unless its real parent, which
    may be us, must see the exit."""
    cdef siginfo_t info
    cdef int rc
    memset(&info, 0, sizeof(info))
    while True:
        rc = waitid(P_PID, t.tid, &info, WEXITED | WSTOPPED | WNOWAIT | __WALL)
        if rc == 0 or errno != EINTR:
            break
    if rc < 0:
        return ESRCH if errno == ECHILD else errno     # not our tracee any more
    if info.si_code == CLD_EXITED or info.si_code == CLD_KILLED or info.si_code == CLD_DUMPED:
        if not t.leave_exit_to_parent:
            c_waitpid(t.tid, status, __WALL | WNOHANG)
        t.seized = False
        return ESRCH
    while c_waitpid(t.tid, status, __WALL) < 0:
        if errno != EINTR:
            t.seized = False
            return ESRCH
    if WIFEXITED(status[0]) or WIFSIGNALED(status[0]):
        t.seized = False
        return ESRCH
    return 0


cdef int get_regs(int tid, dt_regs *regs) noexcept nogil:
    cdef iovec iov
    iov.iov_base = regs
    iov.iov_len = sizeof(dt_regs)
    return 0 if pt(PTRACE_GETREGSET, tid, NT_PRSTATUS, <uintptr_t>&iov) == 0 else errno


cdef int set_regs(int tid, dt_regs *regs) noexcept nogil:
    cdef iovec iov
    iov.iov_base = regs
    iov.iov_len = sizeof(dt_regs)
    return 0 if pt(PTRACE_SETREGSET, tid, NT_PRSTATUS, <uintptr_t>&iov) == 0 else errno


cdef int stop_thread(Tracee *t) noexcept nogil:
    """SEIZE + INTERRUPT, then wait for the interrupt trap (or a group-stop).
    A signal caught on its way to the thread is delivered first, not held:
    the INTERRUPT trap stays pending and fires on the thread's next way out."""
    cdef int status = 0
    cdef int rc, i
    if pt(PTRACE_SEIZE, t.tid, 0, 0) < 0:
        return errno
    t.seized = True
    if pt(PTRACE_INTERRUPT, t.tid, 0, 0) < 0:
        return errno
    for i in range(64):
        rc = wait_stop(t, &status)
        if rc:
            return rc
        if (status >> 16) == PTRACE_EVENT_STOP:
            t.in_signal_stop = False
            return 0
        if (status >> 16) == 0:
            # signal-delivery-stop: let this one through, unchanged
            if pt(PTRACE_CONT, t.tid, 0, WSTOPSIG(status)) < 0:
                return errno
        elif pt(PTRACE_CONT, t.tid, 0, 0) < 0:
            return errno
    return EAGAIN  # a storm of signals kept it from stopping


cdef void keep_signal(Tracee *t, siginfo_t *info) noexcept nogil:
    if t.nkept < MAX_KEPT_SIGNALS:
        memcpy(&t.kept[t.nkept], info, sizeof(siginfo_t))
        t.nkept += 1
    elif t.nlost_kept < MAX_KEPT_SIGNALS:
        t.lost_signo[t.nlost_kept] = info.si_signo
        t.nlost_kept += 1


cdef int run_syscall(Tracee *t, long nr, uint64_t a0, uint64_t a1, long *ret) noexcept nogil:
    """Execute syscall nr(a0, a1) in the stopped thread with one single-step at
    t.insn. 0 and *ret = its return value (-errno on failure), or an error."""
    cdef dt_regs regs
    cdef siginfo_t info
    cdef int status = 0
    cdef int rc, i, sig
    memcpy(&regs, &t.saved, sizeof(dt_regs))
    dt_set_syscall(&regs, t.insn, nr, a0, a1)
    rc = set_regs(t.tid, &regs)
    if rc:
        return rc
    for i in range(MAX_STOPS_PER_STEP):
        # Resuming with 0 drops the signal of a signal-delivery-stop: ours
        # (the step's SIGTRAP) or one kept for re-delivery below.
        if pt(PTRACE_SINGLESTEP, t.tid, 0, 0) < 0:
            return errno
        rc = wait_stop(t, &status)
        if rc:
            return rc
        if (status >> 16) != 0:
            t.in_signal_stop = False    # group-stop or INTERRUPT trap: step again
            continue
        t.in_signal_stop = True
        sig = WSTOPSIG(status)
        rc = get_regs(t.tid, &regs)
        if rc:
            return rc
        if sig == SIGTRAP and dt_pc(&regs) == t.insn + DT_SYSCALL_INSN_LEN:
            ret[0] = dt_syscall_ret(&regs)
            return 0
        if sig == SIGTRAP and dt_pc(&regs) == t.insn:
            continue                    # trapped before executing: again
        memset(&info, 0, sizeof(info))
        if pt(PTRACE_GETSIGINFO, t.tid, 0, <uintptr_t>&info) < 0:
            return errno
        if sig == SIGSYS and info.si_code == SI_SYS_SECCOMP:
            return E_SECCOMP_TRAP
        if info.si_code <= 0:
            # Sent by a process (kill, tgkill, sigqueue) and unblockable
            # (SIGSTOP): keep it for detach, then step again.
            keep_signal(t, &info)
            continue
        return E_FAULT_SIGNAL
    return EAGAIN


cdef int restore_and_detach(Tracee *t) noexcept nogil:
    """Put back registers and mask, detach, hand back kept signals. Errors
    here mean the thread is gone: nothing more to restore."""
    cdef int rc = 0
    cdef int status = 0
    cdef int i, first_sig = 0
    if not t.seized:
        return ESRCH
    if t.have_regs:
        rc = set_regs(t.tid, &t.saved)
    if t.have_mask and pt(PTRACE_SETSIGMASK, t.tid, sizeof(uint64_t), <uintptr_t>&t.saved_mask) < 0:
        rc = rc or errno
    i = 0
    if t.in_signal_stop and t.nkept:
        # DETACH from a signal-delivery-stop delivers its data signal; the
        # siginfo goes with it (ptrace_signal() keeps ours if signo matches).
        if pt(PTRACE_SETSIGINFO, t.tid, 0, <uintptr_t>&t.kept[0]) == 0:
            first_sig = t.kept[0].si_signo
            i = 1
    if pt(PTRACE_DETACH, t.tid, 0, first_sig) < 0:
        # Not stopped any more: it was killed. Reap the ptrace link (or leave
        # the exit to its real parent) so that no zombie is kept around.
        rc = rc or errno
        while wait_stop(t, &status) == 0:
            if pt(PTRACE_DETACH, t.tid, 0, 0) == 0:
                break
    t.seized = False
    while i < t.nkept:
        syscall(SYS_tgkill, t.pid, t.tid, t.kept[i].si_signo)
        i += 1
    for i in range(t.nlost_kept):
        syscall(SYS_tgkill, t.pid, t.tid, t.lost_signo[i])
    return rc


cdef bint code_at(int pid, uint64_t addr, const unsigned char *want, int n) noexcept nogil:
    cdef unsigned char got[16]
    cdef iovec local, remote
    local.iov_base = got
    local.iov_len = n
    remote.iov_base = <void *><uintptr_t>addr
    remote.iov_len = n
    return process_vm_readv(pid, &local, 1, &remote, 1, 0) == n and memcmp(got, want, n) == 0


# -- finding a syscall instruction in the target -------------------------------
cdef object _own_vdso_insn_offset = None


def _vdso_range(pid):
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            if line.rstrip().endswith("[vdso]"):
                lo, _, hi = line.split()[0].partition("-")
                return int(lo, 16), int(hi, 16)
    return None


cdef object _insn_offset_in_own_vdso():
    """Offset of the first syscall instruction in our vdso. Every 64-bit
    process on this kernel maps the same vdso image, so the offset holds in
    the target's too (checked there before use)."""
    global _own_vdso_insn_offset
    cdef const unsigned char *base
    cdef Py_ssize_t size, i
    if _own_vdso_insn_offset is None:
        rng = _vdso_range("self")
        if rng is None:
            _own_vdso_insn_offset = -1
        else:
            base = <const unsigned char *><uintptr_t>rng[0]
            size = rng[1] - rng[0]
            _own_vdso_insn_offset = -1
            for i in range(size - DT_SYSCALL_INSN_LEN + 1):
                if memcmp(base + i, dt_syscall_insn, DT_SYSCALL_INSN_LEN) == 0:
                    _own_vdso_insn_offset = i
                    break
    return _own_vdso_insn_offset


def find_syscall_insn(int pid):
    """Address of a syscall instruction in process pid's executable memory:
    in its vdso if possible, else in its first executable file mappings.
    Read with process_vm_readv, never written. None if there is none."""
    offset = _insn_offset_in_own_vdso()
    rng = _vdso_range(pid)
    if rng is not None and offset >= 0 and code_at(pid, rng[0] + offset, dt_syscall_insn,
                                                    DT_SYSCALL_INSN_LEN):
        return rng[0] + offset
    needle = bytes(dt_syscall_insn[:DT_SYSCALL_INSN_LEN])
    budget = 8 << 20
    with open(f"/proc/{pid}/maps") as maps:
        lines = maps.read().splitlines()
    for line in lines:
        fields = line.split()
        if len(fields) < 2 or fields[1][0] != "r" or fields[1][2] != "x":
            continue
        lo, _, hi = fields[0].partition("-")
        start, end = int(lo, 16), min(int(hi, 16), int(lo, 16) + budget)
        try:
            with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
                mem.seek(start)
                data = mem.read(end - start)
        except OSError:
            continue
        budget -= len(data)
        at = data.find(needle)
        if at >= 0:
            return start + at
        if budget <= 0:
            break
    return None


def _address_space_gone(pid):
    """True if pid has exited or is exiting: its /proc maps are gone or empty."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return not maps.read(1)
    except OSError:
        return True


# -- choosing the thread ---------------------------------------------------------
# Syscalls that return EINTR to the program, with no restart, when their thread
# is merely stopped and resumed (signal(7), "Interruption of system calls ...
# by stop signals"). x86-64 numbers. A thread sleeping in one is passed over
# when another thread will do.
_EINTR_ON_STOP = {232: "epoll_wait", 281: "epoll_pwait", 441: "epoll_pwait2",
                  65: "semop", 220: "semtimedop", 128: "rt_sigtimedwait"}


def _thread_syscall(pid, tid):
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            first = f.read().split()[0]
    except (OSError, IndexError):
        return None
    return -1 if first == "running" else int(first)


def _thread_state(pid, tid):
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return "X"


def pick_thread(int pid):
    """The thread to inject through: a live one (not zombie, not in
    uninterruptible sleep), preferring one whose syscall restarts cleanly,
    then the thread group leader."""
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        return None
    best = None
    for tid in tids:
        state = _thread_state(pid, tid)
        if state in ("Z", "X", "x"):
            continue
        score = 0
        if state == "D":
            score += 4          # PTRACE_INTERRUPT waits until it wakes up
        if _thread_syscall(pid, tid) in _EINTR_ON_STOP:
            score += 2
        if tid != pid:
            score += 1
        if best is None or score < best[0]:
            best = (score, tid)
    return None if best is None else best[1]


# -- errors -------------------------------------------------------------------------
def _status_fields(pid):
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    except OSError:
        pass
    return fields


def _we_have_cap_sys_ptrace():
    try:
        return bool(int(_status_fields("self").get("CapEff", "0"), 16) & (1 << 19))
    except ValueError:
        return False


def _seize_denied(pid, int err):
    from dirtytrack.errors import ProcessGone, PtraceDenied
    status = _status_fields(pid)
    # ptrace_attach() answers EPERM, not ESRCH, for a task already exiting.
    if err == ESRCH or not status or status.get("State", "Z")[0] in "ZX" \
            or _address_space_gone(pid):
        return ProcessGone(f"process {pid} exited before it could be attached", ESRCH)
    tracer = int(status.get("TracerPid", "0") or 0)
    if tracer and tracer != os.getpid():
        return PtraceDenied(
            f"process {pid} is already traced by process {tracer} (a debugger, strace, or "
            "another tracker): detach that tracer first, only one can trace a process", err)
    reasons = []
    if not _we_have_cap_sys_ptrace():
        reasons.append("this process lacks CAP_SYS_PTRACE: run as root or grant it "
                       "(setcap cap_sys_ptrace+ep, or --cap-add SYS_PTRACE in a container)")
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = int(f.read())
    except (OSError, ValueError):
        scope = None
    if scope:
        reasons.append(f"Yama's kernel.yama.ptrace_scope is {scope}: "
                       + ("only CAP_SYS_PTRACE may attach (set it to 1 or lower, or grant the "
                          "capability)" if scope < 3 else "ptrace attach is disabled until reboot"))
    if not reasons:
        reasons.append("the target runs as another user, is not dumpable "
                       "(prctl PR_SET_DUMPABLE 0), or an LSM (SELinux, AppArmor) denies ptrace")
    return PtraceDenied(f"cannot ptrace process {pid}: " + "; ".join(reasons), err)


def _injection_error(pid, stage, int rc):
    from dirtytrack.errors import InjectionFailed, ProcessGone
    if rc == ESRCH:
        return ProcessGone(f"process {pid} exited during the injection ({stage}); "
                           "nothing was left behind in this process", ESRCH)
    if rc == E_SECCOMP_TRAP:
        return InjectionFailed(f"a seccomp filter in process {pid} traps userfaultfd(2) "
                               "(SIGSYS): allow the syscall in its filter, or have the program "
                               "hand its userfaultfd over (dirtytrack.handover)", EPERM)
    if rc == E_FAULT_SIGNAL:
        return InjectionFailed(f"the instruction used in process {pid} did not run as a "
                               "syscall (it faulted); its memory map changed under us: retry",
                               EIO)
    if rc == E_NOT_NATIVE:
        return InjectionFailed(f"process {pid} is a 32-bit (ia32) program: only native "
                               "64-bit processes can be attached", EINVAL)
    return InjectionFailed(f"injection into process {pid} failed at {stage}: "
                           f"{os.strerror(rc)}", rc)


# -- the primitive ------------------------------------------------------------------
cdef int _inject_stopped(Tracee *t, int pidfd, long *our_fd, long *target_rc,
                         bint *user_mode_only, const char **stage) noexcept nogil:
    """Everything done while the thread is stopped. 0 or an error code; on
    success *our_fd is the duplicate and the target's fd has been closed."""
    cdef long r = 0
    cdef long closed = 0
    cdef int rc
    cdef uint64_t all_signals = DT_SIGSET_ALL
    cdef char link[64]
    cdef char path[64]
    cdef Py_ssize_t n
    stage[0] = "reading registers"
    rc = get_regs(t.tid, &t.saved)
    if rc:
        return rc
    t.have_regs = True
    if not dt_is_native(&t.saved):
        return E_NOT_NATIVE
    stage[0] = "blocking signals"
    if pt(PTRACE_GETSIGMASK, t.tid, sizeof(uint64_t), <uintptr_t>&t.saved_mask) < 0:
        return errno
    if pt(PTRACE_SETSIGMASK, t.tid, sizeof(uint64_t), <uintptr_t>&all_signals) < 0:
        return errno
    t.have_mask = True
    stage[0] = "checking the syscall instruction"
    if not code_at(t.pid, t.insn, dt_syscall_insn, DT_SYSCALL_INSN_LEN):
        return E_FAULT_SIGNAL
    stage[0] = "userfaultfd() in the target"
    rc = run_syscall(t, SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK, 0, &r)
    if rc:
        return rc
    if r == -EPERM:
        # vm.unprivileged_userfaultfd=0 and the target lacks CAP_SYS_PTRACE:
        # user-mode-only faults are still allowed (async WP works the same).
        user_mode_only[0] = True
        rc = run_syscall(t, SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY, 0, &r)
        if rc:
            return rc
    target_rc[0] = r
    if r < 0:
        return 0
    stage[0] = "pidfd_getfd()"
    our_fd[0] = syscall(SYS_pidfd_getfd, pidfd, r, 0)
    if our_fd[0] < 0:
        our_fd[0] = -errno
    stage[0] = "close() in the target"
    # Another thread of the target could have closed r and reused the number
    # meanwhile: close it only if it is still a userfaultfd.
    snprintf(path, sizeof(path), "/proc/%d/fd/%ld", t.pid, r)
    n = readlink(path, link, sizeof(link) - 1)
    if n > 0:
        link[n] = 0
        if strcmp(link, "anon_inode:[userfaultfd]") != 0:
            return 0
    rc = run_syscall(t, SYS_close, <uint64_t>r, 0, &closed)
    if rc:
        return rc
    if closed < 0:
        return <int>-closed
    return 0


def inject_userfaultfd(int pid, *, tid=None, bint allow_seccomp=False, _stage_hook=None):
    """A userfaultfd created inside running process `pid`, duplicated into
    this process, without the target's cooperation (ptrace; root or
    CAP_SYS_PTRACE). Returns an ``Injected`` whose ``fd`` this process owns;
    pass it to ``Tracker(pid, uffd=fd)``. One thread of the target is stopped
    for ``stopped_ns`` (typically well under a millisecond); the others run on.

    A target under a seccomp filter is refused unless allow_seccomp=True: a
    filter that kills on userfaultfd(2) would kill it.
    """
    from dirtytrack.errors import InjectionFailed, ProcessGone
    cdef Tracee t
    cdef int pidfd = -1
    cdef int rc = 0
    cdef int drc = 0
    cdef long our_fd = -1
    cdef long target_rc = 0
    cdef bint user_mode_only = False
    cdef const char *stage = "attaching"
    cdef uint64_t t0 = now_ns()
    cdef uint64_t t_stop = 0
    cdef uint64_t t_end = 0
    memset(&t, 0, sizeof(t))
    try:
        pidfd = pidfd_open(pid)
    except OSError as exc:
        if exc.errno == ESRCH:
            raise ProcessGone(f"no process {pid}", ESRCH) from None
        raise InjectionFailed(f"pidfd_open({pid}) failed: {exc.strerror} "
                              "(Linux 5.3+ is needed)", exc.errno) from None
    try:
        status = _status_fields(pid)
        if not status or status.get("State", "").startswith(("Z", "X")):
            raise ProcessGone(f"process {pid} has exited", ESRCH)
        if status.get("Seccomp", "0") == "2" and not allow_seccomp:
            raise InjectionFailed(
                f"process {pid} runs under a seccomp filter: if it kills on userfaultfd(2), "
                "injecting would kill the process. Pass allow_seccomp=True if its filter "
                "allows userfaultfd or returns an error, or have the program hand its "
                "userfaultfd over (dirtytrack.handover)", EPERM)
        try:
            insn = find_syscall_insn(pid)
        except OSError:
            insn = None
        if insn is None and _address_space_gone(pid):
            raise ProcessGone(f"process {pid} exited (its address space is gone)", ESRCH)
        if insn is None:
            raise InjectionFailed(f"no syscall instruction found in process {pid}'s "
                                  "executable mappings", ENOENT)
        if tid is not None and not os.path.exists(f"/proc/{pid}/task/{int(tid)}"):
            raise ValueError(f"thread {tid} is not a thread of process {pid}")
        chosen = pick_thread(pid) if tid is None else int(tid)
        if chosen is None:
            raise ProcessGone(f"process {pid} has no live thread", ESRCH)
        t.pid = pid
        t.tid = chosen
        t.insn = insn
        t.leave_exit_to_parent = (chosen == pid and int(status.get("PPid", "0")) == os.getpid())
        with nogil:
            t_stop = now_ns()
            rc = stop_thread(&t)
        if rc:
            if not t.seized or rc == ESRCH:
                raise _seize_denied(pid, rc)
            raise _injection_error(pid, "stopping the thread", rc)
        if _stage_hook is not None:
            _stage_hook("stopped", t.tid)
        with nogil:
            rc = _inject_stopped(&t, pidfd, &our_fd, &target_rc, &user_mode_only, &stage)
        if _stage_hook is not None:
            _stage_hook("injected", t.tid)
        with nogil:
            drc = restore_and_detach(&t)
            t_end = now_ns()
        if rc == 0 and drc:
            # Registers or mask could not be put back: the thread is gone
            # (killed while stopped), and with it the use of this uffd.
            stage = "restoring the thread"
            rc = ESRCH
        if rc:
            raise _injection_error(pid, stage.decode(), rc)
        if target_rc < 0:
            raise error_for("userfaultfd", <int>-target_rc)
        if our_fd < 0:
            raise InjectionFailed(f"pidfd_getfd of process {pid}'s userfaultfd failed: "
                                  f"{os.strerror(<int>-our_fd)}", <int>-our_fd)
        result = Injected(int(our_fd), pid, t.tid, t_end - t_stop, now_ns() - t0,
                          bool(user_mode_only), dt_interrupted_nr(&t.saved) if t.have_regs else -1,
                          t.nkept + t.nlost_kept)
        our_fd = -1
        return result
    finally:
        if t.seized:
            with nogil:
                restore_and_detach(&t)
        if our_fd >= 0:
            close(our_fd)
        close(pidfd)
