"""Raw memory syscalls for tests (ctypes over libc): mappings at known
addresses, madvise, mprotect, mremap, memfd, hugetlb reservations, and
writes that run without the GIL (ctypes releases it around foreign calls).

Tests use these to make the kernel do exactly what a tracked program would.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap as _mmap
import os

PAGE = _mmap.PAGESIZE
HPAGE_2M = 2 << 20

PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_NORESERVE, MAP_HUGETLB, MAP_FIXED_NOREPLACE = 0x4000, 0x40000, 0x100000
MADV_DONTNEED, MADV_HUGEPAGE, MADV_NOHUGEPAGE = 4, 14, 15
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MFD_CLOEXEC, MFD_HUGETLB = 1, 4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                         ctypes.c_void_p]
_libc.memset.restype = ctypes.c_void_p
_libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
MAP_FAILED = ctypes.c_void_p(-1).value


def _check(result: int, what: str) -> int:
    if result == -1 or result is None or result == MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def mmap(length: int, prot: int = PROT_READ | PROT_WRITE,
         flags: int = MAP_PRIVATE | MAP_ANONYMOUS, fd: int = -1, offset: int = 0,
         addr: int = 0) -> int:
    return _check(_libc.mmap(addr or None, length, prot, flags, fd, offset), "mmap")


def munmap(addr: int, length: int) -> None:
    _check(_libc.munmap(addr, length), "munmap")


def madvise(addr: int, length: int, advice: int) -> None:
    _check(_libc.madvise(addr, length, advice), "madvise")


def mprotect(addr: int, length: int, prot: int) -> None:
    _check(_libc.mprotect(addr, length, prot), "mprotect")


def mremap(addr: int, old: int, new: int, flags: int = MREMAP_MAYMOVE, new_addr: int = 0) -> int:
    return _check(_libc.mremap(addr, old, new, flags, new_addr or None), "mremap")


def memset(addr: int, value: int, length: int) -> None:
    """Write without the GIL: other Python threads (and scans) run meanwhile."""
    _libc.memset(addr, value, length)


def write_page(addr: int, value: int = 0xA5) -> None:
    ctypes.c_ubyte.from_address(addr).value = value & 0xFF


def read_byte(addr: int) -> int:
    return ctypes.c_ubyte.from_address(addr).value


def mmap_aligned(length: int, align: int, **kw) -> int:
    """An anonymous mapping of `length` bytes whose start is `align`-aligned."""
    raw = mmap(length + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)
    start = (raw + align - 1) & ~(align - 1)
    if start > raw:
        munmap(raw, start - raw)
    tail = raw + length + align - (start + length)
    if tail:
        munmap(start + length, tail)
    flags = kw.pop("flags", MAP_PRIVATE | MAP_ANONYMOUS) | MAP_FIXED
    return mmap(length, kw.pop("prot", PROT_READ | PROT_WRITE), flags, addr=start, **kw)


def memfd(name: str = "dirtytrack-test", size: int = 0, flags: int = MFD_CLOEXEC) -> int:
    fd = os.memfd_create(name, flags)
    if size:
        os.ftruncate(fd, size)
    return fd


@contextlib.contextmanager
def mapping(length: int, **kw):
    """A mapping that is unmapped on exit (ignoring one already gone)."""
    addr = mmap(length, **kw)
    try:
        yield addr
    finally:
        with contextlib.suppress(OSError):
            munmap(addr, length)


NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


def reserve_hugepages(count: int) -> int:
    """Ensure at least `count` free 2 MiB huge pages; returns how many are free.

    Raises OSError(ENOMEM) when the kernel cannot provide them (then a test
    should skip: the machine lacks huge pages, not dirtytrack).
    """
    def free_now() -> int:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("HugePages_Free:"):
                    return int(line.split()[1])
        return 0

    have = free_now()
    if have >= count:
        return have
    with open(NR_HUGEPAGES) as f:
        total = int(f.read())
    try:
        with open(NR_HUGEPAGES, "w") as f:
            f.write(str(total + count - have))
    except OSError as exc:
        raise OSError(errno.ENOMEM, f"cannot reserve huge pages: {exc}") from exc
    have = free_now()
    if have < count:
        raise OSError(errno.ENOMEM, f"only {have} of {count} huge pages could be reserved")
    return have
