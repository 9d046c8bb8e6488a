"""Exceptions dirtytrack raises, each naming the cause and the fix.

The compiled core reports failures as (operation, errno); ``error_for`` turns
that pair into one of the classes below with a message a person can act on.
Every class is an ``OSError`` so ``errno`` stays available to programs.
"""
from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "DirtytrackError",
    "KernelUnsupported",
    "UserfaultfdUnavailable",
    "InvalidRange",
    "RangeBusy",
    "TrackerClosed",
    "PtraceDenied",
    "ProcessGone",
    "InjectionFailed",
    "error_for",
]

MIN_KERNEL = (6, 7)


class DirtytrackError(OSError):
    """Base class of every dirtytrack error."""

    def __init__(self, message: str, errno: int = 0):
        super().__init__(errno, message)
        self.message = message

    def __str__(self) -> str:
        if self.errno:
            return f"{self.message} [{_errno.errorcode.get(self.errno, self.errno)}]"
        return self.message


class KernelUnsupported(DirtytrackError):
    """The running kernel lacks a feature dirtytrack needs."""


class UserfaultfdUnavailable(DirtytrackError, PermissionError):
    """userfaultfd(2) cannot be used by this process (privileges, sysctl, seccomp)."""


class InvalidRange(DirtytrackError, ValueError):
    """The address range or buffer cannot be tracked as given."""


class RangeBusy(DirtytrackError):
    """The range is already tracked by another userfaultfd."""


class TrackerClosed(DirtytrackError, ValueError):
    """The tracker was closed; open a new one."""


class PtraceDenied(DirtytrackError, PermissionError):
    """The target process cannot be ptraced by this one (privileges, Yama, a debugger)."""


class ProcessGone(DirtytrackError, ProcessLookupError):
    """The target process (or the thread being used) exited."""


class InjectionFailed(DirtytrackError):
    """userfaultfd() could not be run inside the target process."""


def kernel_release() -> tuple[int, int]:
    release = os.uname().release
    parts = []
    for piece in release.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def _kernel_hint() -> str:
    major, minor = kernel_release()
    if (major, minor) < MIN_KERNEL:
        return (f" This kernel is {major}.{minor}; async write-protect and PAGEMAP_SCAN "
                f"need Linux {MIN_KERNEL[0]}.{MIN_KERNEL[1]} or newer: upgrade the kernel.")
    return ""


def _range_text(start: int | None, end: int | None) -> str:
    if start is None:
        return ""
    return f" [{start:#x}, {end:#x})"


def error_for(op: str, err: int, start: int | None = None, end: int | None = None) -> DirtytrackError:
    """The exception for a failed kernel operation ``op`` with ``errno`` err."""
    where = _range_text(start, end)
    if op == "userfaultfd":
        if err == _errno.ENOSYS:
            return KernelUnsupported(
                "userfaultfd(2) is not available: the kernel was built without "
                "CONFIG_USERFAULTFD." + _kernel_hint(), err)
        if err == _errno.EPERM:
            return UserfaultfdUnavailable(
                "userfaultfd(2) was refused. Run as root or with CAP_SYS_PTRACE, or set "
                "`sysctl vm.unprivileged_userfaultfd=1`, or grant access to /dev/userfaultfd. "
                "In a container, the default seccomp profile blocks userfaultfd: use a "
                "profile that allows it (see deploy/).", err)
        return UserfaultfdUnavailable(f"userfaultfd(2) failed: {os.strerror(err)}", err)
    if op == "api":
        return KernelUnsupported(
            "the userfaultfd handshake (UFFDIO_API) was refused: the kernel does not offer "
            "async write-protect (UFFD_FEATURE_WP_ASYNC)." + _kernel_hint(), err)
    if op == "register":
        if err == _errno.EBUSY:
            return RangeBusy(
                f"range{where} is already tracked by another userfaultfd (another tracker, "
                "a debugger or the program itself): close that tracker first", err)
        if err == _errno.EINVAL:
            return InvalidRange(
                f"cannot track{where}: for hugetlb mappings start and length must be multiples "
                "of the huge page size; otherwise the mapping type cannot be write-protected "
                "(e.g. VM_DROPPABLE). Check /proc/PID/smaps (KernelPageSize)", err)
        if err == _errno.EPERM:
            return InvalidRange(
                f"cannot track{where}: the mapping can never be written (a shared mapping of a "
                "file opened read-only)", err)
        if err == _errno.ENOMEM:
            return InvalidRange(f"cannot track{where}: the process's address space is gone "
                                "(it exited) or the kernel is out of memory", err)
    if op == "writeprotect" and err == _errno.ENOENT:
        return InvalidRange(f"cannot write-protect{where}: the range is no longer mapped", err)
    if op == "pagemap":
        if err in (_errno.EACCES, _errno.EPERM):
            return UserfaultfdUnavailable(
                "cannot open /proc/PID/pagemap for scanning: ptrace read access to the process "
                "is needed (same user, or CAP_SYS_PTRACE)", err)
        if err == _errno.ENOENT:
            return InvalidRange("the process is gone: /proc/PID/pagemap does not exist", err)
    if op == "scan" and err in (_errno.EINVAL, _errno.ENOTTY):
        return KernelUnsupported(
            "PAGEMAP_SCAN is not supported by this kernel." + _kernel_hint(), err)
    return DirtytrackError(f"{op}{where} failed: {os.strerror(err)}", err)
