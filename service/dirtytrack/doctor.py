"""`dirtytrack doctor`: can this machine track writes, and if not, what to do.

Each check prints one line; a failed one says how to fix it. The last check
tracks a real mapping end to end, so exit status 0 means tracking works here.
"""
from __future__ import annotations

import mmap
import os
import platform
from dataclasses import dataclass

from dirtytrack.errors import MIN_KERNEL, DirtytrackError, kernel_release

CAP_SYS_PTRACE = 19


@dataclass
class Check:
    name: str
    status: str          # "ok", "fail", "warn", "info"
    detail: str
    fix: str = ""

    @property
    def required_ok(self) -> bool:
        return self.status != "fail"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _status_field(name: str) -> str | None:
    for line in (_read("/proc/self/status") or "").splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return None


def check_kernel() -> Check:
    major, minor = kernel_release()
    release = os.uname().release
    if (major, minor) >= MIN_KERNEL:
        return Check("kernel", "ok", f"Linux {release} (async write-protect needs 6.7+)")
    return Check("kernel", "fail", f"Linux {release} is older than 6.7",
                 "upgrade to Linux 6.7 or newer (UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN)")


def check_arch() -> Check:
    machine = platform.machine()
    if machine in ("x86_64", "aarch64"):
        return Check("architecture", "ok", machine)
    return Check("architecture", "fail", f"{machine} is not supported",
                 "run on x86_64 or aarch64")


def check_privileges() -> Check:
    cap_eff = int(_status_field("CapEff") or "0", 16)
    ptrace = bool(cap_eff & (1 << CAP_SYS_PTRACE))
    who = f"uid {os.geteuid()}, CAP_SYS_PTRACE {'yes' if ptrace else 'no'}"
    if ptrace:
        return Check("privileges", "ok", who)
    return Check("privileges", "warn", who,
                 "tracking other processes needs CAP_SYS_PTRACE (run as root, or "
                 "`setcap cap_sys_ptrace+ep`); this process can still track itself")


def check_yama() -> Check:
    scope = _read("/proc/sys/kernel/yama/ptrace_scope")
    if scope is None:
        return Check("ptrace scope", "ok", "Yama is not active")
    meaning = {"0": "classic", "1": "restricted to descendants unless CAP_SYS_PTRACE",
               "2": "CAP_SYS_PTRACE only", "3": "ptrace disabled"}.get(scope, "unknown")
    if scope == "3":
        return Check("ptrace scope", "warn", f"kernel.yama.ptrace_scope=3 ({meaning})",
                     "attaching to processes without their cooperation is impossible until "
                     "reboot; use the cooperative hand-over (dirtytrack.handover)")
    return Check("ptrace scope", "ok", f"kernel.yama.ptrace_scope={scope} ({meaning})")


def check_seccomp() -> Check:
    mode = _status_field("Seccomp")
    if mode in (None, "0"):
        return Check("seccomp", "ok", "no seccomp filter")
    return Check("seccomp", "info", f"seccomp mode {mode} (a filter is active)",
                 "if userfaultfd fails below, allow the userfaultfd syscall in the "
                 "container's seccomp profile (deploy/ has one)")


def check_userfaultfd_access() -> Check:
    sysctl = _read("/proc/sys/vm/unprivileged_userfaultfd")
    dev = "/dev/userfaultfd"
    dev_state = "present" if os.path.exists(dev) else "absent"
    if os.path.exists(dev) and os.access(dev, os.R_OK | os.W_OK):
        dev_state = "present, accessible"
    return Check("userfaultfd access", "info",
                 f"vm.unprivileged_userfaultfd={sysctl if sysctl is not None else '?'}, "
                 f"{dev} {dev_state}")


def check_userfaultfd() -> Check:
    from dirtytrack import _core
    try:
        fd, how = _core.open_userfaultfd()
    except DirtytrackError as exc:
        return Check("userfaultfd", "fail", "cannot create a userfaultfd", exc.message)
    os.close(fd)
    return Check("userfaultfd", "ok", f"created via {how}")


def check_features() -> Check:
    from dirtytrack import _core
    try:
        features = _core.query_features()
    except DirtytrackError as exc:
        return Check("async write-protect", "fail", "cannot query userfaultfd features",
                     exc.message)
    missing = [name for bit, name in ((_core.FEATURE_WP_ASYNC, "WP_ASYNC"),
                                      (_core.FEATURE_WP_UNPOPULATED, "WP_UNPOPULATED"))
               if not features & bit]
    if missing:
        return Check("async write-protect", "fail",
                     f"features {features:#x} lack {', '.join(missing)}",
                     "upgrade to Linux 6.7 or newer")
    return Check("async write-protect", "ok", f"WP_ASYNC and WP_UNPOPULATED offered ({features:#x})")


def check_tracking() -> Check:
    """Track a real mapping: write page 2, expect exactly page 2, then nothing."""
    import dirtytrack
    buf = mmap.mmap(-1, 4 * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        with dirtytrack.track(buf) as t:
            buf[2 * mmap.PAGESIZE] = 1
            first = t.collect()
            second = t.collect()
    except DirtytrackError as exc:
        return Check("PAGEMAP_SCAN tracking", "fail", "end-to-end tracking failed", str(exc))
    finally:
        buf.close()
    if first.pages() != [2] or second.pages():
        return Check("PAGEMAP_SCAN tracking", "fail",
                     f"wrote page 2, got {first.pages()} then {second.pages()}",
                     "report this kernel version to the dirtytrack developers")
    return Check("PAGEMAP_SCAN tracking", "ok", "wrote page 2, collected exactly [2], then []")


def check_procmap_query() -> Check:
    major, minor = kernel_release()
    if (major, minor) >= (6, 11):
        return Check("PROCMAP_QUERY", "ok", "mapping checks use the ioctl (6.11+)")
    return Check("PROCMAP_QUERY", "info", "not available before 6.11: mapping checks "
                 "read /proc/PID/maps (slower scans)")


def check_hugepages() -> Check:
    total = _read("/proc/sys/vm/nr_hugepages")
    thp = _read("/sys/kernel/mm/transparent_hugepage/enabled") or "?"
    return Check("huge pages", "info",
                 f"hugetlb pages reserved: {total}; THP: {thp} "
                 "(hugetlb is tracked per huge page, THP is split to 4 KiB on first write)")


def run_checks() -> list[Check]:
    checks = [check_kernel(), check_arch(), check_privileges(), check_yama(), check_seccomp(),
              check_userfaultfd_access(), check_userfaultfd()]
    if checks[-1].status == "ok":
        checks.append(check_features())
        if checks[-1].status == "ok":
            checks.append(check_tracking())
    checks += [check_procmap_query(), check_hugepages()]
    return checks


MARK = {"ok": "[ ok ]", "fail": "[FAIL]", "warn": "[warn]", "info": "[info]"}


def report(checks: list[Check], out) -> bool:
    for check in checks:
        print(f"{MARK[check.status]} {check.name}: {check.detail}", file=out)
        if check.fix and check.status != "ok":
            print(f"       fix: {check.fix}", file=out)
    works = all(c.required_ok for c in checks) and any(
        c.name == "PAGEMAP_SCAN tracking" and c.status == "ok" for c in checks)
    print("tracking works on this machine" if works else "tracking does NOT work here: "
          "see the fixes above", file=out)
    return works
