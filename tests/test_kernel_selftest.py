"""Port of the kernel selftest tools/testing/selftests/mm/pagemap_ioctl.c.

Each test names the selftest function (and step) it ports. They run against
the real kernel through our Cython layer: ``Tracker`` (UFFDIO_REGISTER +
UFFDIO_WRITEPROTECT, then collect()/scan() = PAGEMAP_SCAN with
WP_MATCHING|CHECK_WPASYNC) where the case is about tracking semantics, and
``_core.pagemap_scan`` (one raw ioctl) for argument, walk_end, max_pages and
category cases. ``Tracker.add_range`` is the selftest's wp_init();
``wp_reset`` below is its wp_addr_range() (WP scan with no output vector).

Deliberate deviations from the C source are noted where they occur; cases
the wrapper cannot express (an output vector of NULL with a non-zero length)
are left out.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import os
import random
import resource
import threading
import time

import pytest

import kmem
from dirtytrack import _core
from dirtytrack.errors import InvalidRange

P = kmem.PAGE
H = kmem.HPAGE_2M                     # PMD size: THP and default hugetlb size
HP = H // P                           # base pages per huge page

WPALLOWED = _core.CATEGORY_WPALLOWED
WRITTEN = _core.CATEGORY_WRITTEN
FILE = _core.CATEGORY_FILE
PRESENT = _core.CATEGORY_PRESENT
SWAPPED = _core.CATEGORY_SWAPPED
PFNZERO = _core.CATEGORY_PFNZERO
HUGE = _core.CATEGORY_HUGE
BITS_ALL = WPALLOWED | WRITTEN | FILE | PRESENT | SWAPPED | PFNZERO | HUGE
NON_WRITTEN_BITS = BITS_ALL & ~WRITTEN
WP = _core.SCAN_WP_MATCHING | _core.SCAN_CHECK_WPASYNC
ULONG_MAX = (1 << 64) - 1

THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
THP_PMD_SIZE = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"
THP_ZERO_PAGE = "/sys/kernel/mm/transparent_hugepage/use_zero_page"


# --------------------------------------------------------------------------
# helpers

def npages(region) -> int:
    """LEN() of the selftest: pages in one (start, end, categories) entry."""
    return (region[1] - region[0]) // P


def pages_of(regions, base: int) -> set[int]:
    """Page indexes (relative to base) of a raw scan's regions."""
    out: set[int] = set()
    for start, end, _ in regions:
        out.update(range((start - base) // P, (end - base) // P))
    return out


def expand(pages, unit: int) -> set[int]:
    """The pages a scan at `unit`-page granularity reports for `pages`."""
    return {q for p in pages for q in range(p // unit * unit, p // unit * unit + unit)}


def write_pages(base: int, pages, value: int = 0xA5) -> None:
    for p in pages:
        kmem.write_page(base + p * P, value)


def thp_mode() -> str | None:
    try:
        with open(THP_ENABLED) as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


def require_thp() -> None:
    mode = thp_mode()
    if mode is None:
        pytest.skip(f"transparent huge pages: {THP_ENABLED} does not exist (no CONFIG_TRANSPARENT_HUGEPAGE)")
    if mode == "never":
        pytest.skip(f"transparent huge pages are disabled ({THP_ENABLED} shows [never])")
    with open(THP_PMD_SIZE) as f:
        assert int(f.read()) == H, "these tests assume a 2 MiB PMD size"


def require_hugepages(count: int) -> None:
    try:
        kmem.reserve_hugepages(count)
    except OSError as exc:
        pytest.skip(f"hugetlb: cannot reserve {count} free 2 MiB huge pages: {exc}")


_libc = ctypes.CDLL(None, use_errno=True)
_libc.shmget.restype = ctypes.c_int
_libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
_libc.shmat.restype = ctypes.c_void_p
_libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.shmdt.argtypes = [ctypes.c_void_p]
_libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
IPC_PRIVATE, IPC_CREAT, IPC_RMID, SHM_HUGETLB = 0, 0o1000, 0, 0o4000


class Env:
    """One Tracker plus the mappings and regions of a test, all released in
    reverse order (regions removed before their mappings are unmapped)."""

    def __init__(self, stack: contextlib.ExitStack, tmp_path):
        self.stack = stack
        self.tmp_path = tmp_path
        self.t = _core.Tracker()
        stack.callback(self.t.close)

    @property
    def fd(self) -> int:
        return self.t.pagemap_fileno()

    # -- memory ------------------------------------------------------------
    def _unmap_later(self, addr: int, length: int) -> None:
        def unmap():
            with contextlib.suppress(OSError):
                kmem.munmap(addr, length)
        self.stack.callback(unmap)

    def map(self, length: int, **kw) -> int:
        addr = kmem.mmap(length, **kw)
        self._unmap_later(addr, length)
        return addr

    def map_anon(self, npg: int, prot: int = kmem.PROT_READ | kmem.PROT_WRITE) -> int:
        """Private anonymous pages, kept out of THP so results are per page."""
        addr = self.map(npg * P, prot=prot)
        kmem.madvise(addr, npg * P, kmem.MADV_NOHUGEPAGE)
        return addr

    def map_thp(self, length: int) -> int:
        """The selftest's gethugepage(): PMD-aligned, MADV_HUGEPAGE, populated
        (memset 0) before it is tracked. Checks the kernel really used THPs."""
        require_thp()
        addr = kmem.mmap_aligned(length, H)
        self._unmap_later(addr, length)
        try:
            kmem.madvise(addr, length, kmem.MADV_HUGEPAGE)
        except OSError as exc:
            pytest.skip(f"transparent huge pages: MADV_HUGEPAGE refused: {exc}")
        kmem.memset(addr, 0, length)
        regions, _ = self.scan(addr, length, req=HUGE, ret=HUGE)
        assert pages_of(regions, addr) == set(range(length // P)), \
            f"the kernel did not back the MADV_HUGEPAGE range with THPs: {regions}"
        return addr

    def map_hugetlb(self, length: int = H) -> int:
        require_hugepages(length // H)
        try:
            return self.map(length, flags=kmem.MAP_PRIVATE | kmem.MAP_ANONYMOUS | kmem.MAP_HUGETLB)
        except OSError as exc:
            pytest.skip(f"hugetlb: MAP_HUGETLB mapping failed: {exc}")

    def map_hugetlb_memfd(self, length: int = H) -> int:
        require_hugepages(length // H)
        fd = kmem.memfd("pagemap-ioctl-hugetlb", flags=kmem.MFD_CLOEXEC | kmem.MFD_HUGETLB)
        try:
            os.ftruncate(fd, length)
            return self.map(length, flags=kmem.MAP_SHARED, fd=fd)
        except OSError as exc:
            pytest.skip(f"hugetlb: memfd MFD_HUGETLB mapping failed: {exc}")
        finally:
            os.close(fd)

    def map_hugetlb_shm(self, length: int = H) -> int:
        require_hugepages(length // H)
        shmid = _libc.shmget(IPC_PRIVATE, length, IPC_CREAT | SHM_HUGETLB | 0o600)
        if shmid < 0:
            err = ctypes.get_errno()
            pytest.skip(f"hugetlb: shmget(SHM_HUGETLB) failed: {os.strerror(err)}")
        addr = _libc.shmat(shmid, None, 0)
        # Marked for removal now: the segment goes away at shmdt.
        _libc.shmctl(shmid, IPC_RMID, None)
        if addr in (None, kmem.MAP_FAILED):
            pytest.fail(f"shmat of a hugetlb segment failed: {os.strerror(ctypes.get_errno())}")
        self.stack.callback(_libc.shmdt, addr)
        return addr

    def map_file_private(self, npg: int, fd: int) -> int:
        return self.map(npg * P, flags=kmem.MAP_PRIVATE, fd=fd)

    def temp_file(self, name: str, data: bytes) -> int:
        path = self.tmp_path / name
        path.write_bytes(data)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.stack.callback(os.close, fd)
        return fd

    # -- tracking ----------------------------------------------------------
    def track(self, addr: int, length: int):
        """wp_init(): UFFDIO_REGISTER(WP) + UFFDIO_WRITEPROTECT through Tracker."""
        region = self.t.add_range(addr, length)

        def untrack():
            if region in self.t.regions:
                self.t.remove_range(region)
        self.stack.callback(untrack)
        return region

    def scan(self, addr: int, length: int, *, flags: int = 0, req: int = 0, anyof: int = 0,
             excl: int = 0, ret: int = 0, vec_len: int = 1024, max_pages: int = 0):
        """The selftest's pagemap_ioc(): one PAGEMAP_SCAN; (regions, walk_end)."""
        return _core.pagemap_scan(self.fd, addr, addr + length, flags=flags, category_mask=req,
                                  category_anyof_mask=anyof, category_inverted=excl,
                                  return_mask=ret, vec_len=vec_len, max_pages=max_pages)

    def written(self, addr: int, length: int, **kw):
        """Written pages, without resetting them (flags=0, fast-path masks)."""
        kw.setdefault("req", WRITTEN)
        kw.setdefault("ret", WRITTEN)
        return self.scan(addr, length, **kw)[0]

    def wp_reset(self, addr: int, length: int) -> None:
        """wp_addr_range(): re-protect everything, no output vector."""
        regions, walk_end = self.scan(addr, length, flags=WP, req=WRITTEN, ret=WRITTEN, vec_len=0)
        assert regions == [] and walk_end == addr + length


@pytest.fixture
def env(tmp_path):
    with contextlib.ExitStack() as stack:
        yield Env(stack, tmp_path)


# --------------------------------------------------------------------------
# sanity_tests_sd()

def test_sd_argument_checks(env):
    """sanity_tests_sd() step 1: argument validation of PAGEMAP_SCAN."""
    n = 1000
    mem = env.map_anon(n)
    env.track(mem, n * P)
    env.wp_reset(mem, n * P)

    assert env.scan(mem, 0, req=BITS_ALL, ret=BITS_ALL, vec_len=500) == ([], mem), \
        "zero range size is valid"
    assert env.scan(mem, n * P, req=BITS_ALL, ret=BITS_ALL, vec_len=0)[0] == [], \
        "output buffer can be 0"
    with pytest.raises(OSError) as exc:
        env.scan(mem, n * P, flags=ULONG_MAX, req=WRITTEN, ret=WRITTEN)
    assert exc.value.errno == errno.EINVAL, "wrong flag specified"
    with pytest.raises(OSError) as exc:
        env.scan(mem, n * P, flags=WP | 0xFF, req=WRITTEN, ret=WRITTEN)
    assert exc.value.errno == errno.EINVAL, "flag has extra bits specified"
    # No selection mask: every page matches; nothing is written, so one
    # region of all pages with no returned category.
    assert env.scan(mem, n * P, ret=WRITTEN)[0] == [(mem, mem + n * P, 0)], \
        "no selection mask is specified"
    assert env.scan(mem, n * P, req=WRITTEN, anyof=WRITTEN)[0] == [], "no return mask is specified"
    with pytest.raises(OSError) as exc:
        env.scan(mem, n * P, req=WRITTEN, ret=0x1000)
    assert exc.value.errno == errno.EINVAL, "wrong return mask specified"
    with pytest.raises(OSError) as exc:
        env.scan(mem, n * P, flags=WP, req=0xFFF, anyof=WRITTEN, ret=WRITTEN)
    assert exc.value.errno == errno.EINVAL, "mixture of correct and wrong flag"
    assert env.scan(mem, n * P, flags=WP, excl=BITS_ALL, ret=WRITTEN)[0] == \
        [(mem, mem + n * P, 0)], "PAGEMAP_BITS_ALL can be specified with WP_MATCHING|CHECK_WPASYNC"
    # Not in the selftest, same validation block: start must be page aligned.
    with pytest.raises(OSError) as exc:
        env.scan(mem + 1, P, req=WRITTEN, ret=WRITTEN)
    assert exc.value.errno == errno.EINVAL
    # "Clear area with larger vec size"
    assert env.scan(mem, n * P, flags=WP, req=WRITTEN, ret=WRITTEN, vec_len=500)[0] == []


def test_sd_repeated_pattern_in_parts(env):
    """sanity_tests_sd() steps 3-4: every other page written; read in parts with max_pages."""
    n = 1000
    mem = env.map_anon(n)
    env.track(mem, n * P)
    write_pages(mem, range(0, n, 2))

    regions = env.written(mem, n * P, vec_len=500)
    assert len(regions) == n // 2
    assert pages_of(regions, mem) == set(range(0, n, 2))

    first, _ = env.scan(mem, n * P, flags=WP, req=WRITTEN, ret=WRITTEN, vec_len=500,
                        max_pages=n // 2 - 2)
    peek = env.written(mem, n * P, vec_len=2)
    rest, _ = env.scan(mem, n * P, flags=WP, req=WRITTEN, ret=WRITTEN, vec_len=500)
    assert len(first) == n // 2 - 2 and len(peek) == 2
    assert len(first) + len(rest) == n // 2
    assert pages_of(first, mem) | pages_of(rest, mem) == set(range(0, n, 2))
    assert env.written(mem, n * P) == []


def test_sd_max_pages_cuts_a_region(env):
    """sanity_tests_sd() step 5: max_pages stops inside a two-page region; the rest comes next."""
    n = 1000
    mem = env.map_anon(n)
    env.track(mem, n * P)
    write_pages(mem, list(range(0, n, 2)) + [n - 1])

    regions, walk_end = env.scan(mem, n * P, flags=WP, req=WRITTEN, ret=WRITTEN, vec_len=500,
                                 max_pages=n // 2)
    assert len(regions) == n // 2
    assert regions[-1][:2] == (mem + (n - 2) * P, mem + (n - 1) * P)
    assert walk_end == mem + (n - 1) * P
    rest, _ = env.scan(mem, n * P, flags=WP, req=WRITTEN, ret=WRITTEN, vec_len=500)
    assert rest == [(mem + (n - 1) * P, mem + n * P, WRITTEN)]


def test_sd_get_and_clear_two_pages(env):
    """sanity_tests_sd() step 6: get and clear only pages 1-2; the others stay written."""
    n = 1000
    mem = env.map_anon(n)
    env.track(mem, n * P)
    kmem.memset(mem, 0xFF, n * P)

    regions, _ = env.scan(mem + P, 2 * P, flags=WP, req=WRITTEN, ret=WRITTEN, vec_len=1,
                          max_pages=2)
    assert regions == [(mem + P, mem + 3 * P, WRITTEN)]
    rest = env.written(mem, n * P, vec_len=n)
    assert [(r[0], npages(r)) for r in rest] == [(mem, 1), (mem + 3 * P, n - 3)]


def test_sd_two_regions_are_independent(env):
    """sanity_tests_sd() step 7: resetting one tracked range leaves another one's pages written."""
    n = 1000
    m0, m1 = env.map_anon(n), env.map_anon(n)
    r0, r1 = env.track(m0, n * P), env.track(m1, n * P)
    kmem.memset(m0, ord("a"), n * P)
    kmem.memset(m1, ord("b"), n * P)

    assert env.t.collect(r0).count == n
    regions = env.written(m1, n * P, vec_len=1)
    assert len(regions) == 1 and npages(regions[0]) == n
    d1 = env.t.collect(r1)
    assert d1.ranges() == [(0, n)] and not d1.lost
    assert env.t.collect(r0).count == 0 and env.t.collect(r1).count == 0


def test_sd_smaller_max_pages(env):
    """sanity_tests_sd() step 8: three WP scans of max_pages=210 drain 525 sparse pages."""
    n = 1050
    mem = env.map_anon(n)
    env.track(mem, n * P)
    env.scan(mem, n * P, flags=WP, req=WRITTEN, ret=WRITTEN, vec_len=n // 2)
    write_pages(mem, range(0, n, 2))

    seen: set[int] = set()
    total = 0
    for _ in range(3):
        regions, _ = env.scan(mem, n * P, flags=WP, req=WRITTEN, ret=WRITTEN, vec_len=n // 2,
                              max_pages=n // 5)
        assert len(regions) <= n // 5
        total += len(regions)
        seen |= pages_of(regions, mem)
    assert total == n // 2
    assert seen == set(range(0, n, 2))
    assert env.written(mem, n * P) == []


def test_sd_smaller_vec_resumes_at_walk_end(env):
    """sanity_tests_sd() step 9: random writes, vec_len 50, resume from walk_end until all are read."""
    n, iterations = 10000, 100
    mem = env.map_anon(n)
    env.track(mem, n * P)
    env.wp_reset(mem, n * P)
    rng = random.Random(9)
    for it in range(iterations):
        wrote = [i for i in range(n) if rng.random() < 0.5]
        write_pages(mem, wrote, it)
        read: set[int] = set()
        total_reads, walk_end = 0, mem
        while total_reads < len(wrote):
            assert walk_end < mem + n * P, f"iteration {it}: walk ended with pages unread"
            regions, new_end = env.scan(walk_end, mem + n * P - walk_end, flags=WP, req=WRITTEN,
                                        ret=WRITTEN, vec_len=50)
            assert len(regions) <= 50 and new_end > walk_end
            total_reads += sum(npages(r) for r in regions)
            read |= pages_of(regions, mem)
            walk_end = new_end
        assert total_reads == len(wrote) and read == set(wrote), f"iteration {it}"


def test_tracker_collect_resumes_past_full_vector(env):
    """sanity_tests_sd() step 9 through Tracker: >1024 runs force collect()'s walk_end loop."""
    n = 10000
    mem = env.map_anon(n)
    r = env.track(mem, n * P)
    rng = random.Random(10)
    for it in range(20):
        wrote = [i for i in range(n) if rng.random() < 0.5]
        write_pages(mem, wrote, it)
        d = env.t.collect(r)
        assert not d.lost
        assert len(d.ranges()) > 1024          # more runs than one ioctl's vector holds
        assert d.pages() == wrote, f"iteration {it}"
    assert env.t.collect(r).count == 0


WALK_END_DENSE = [
    # (id, length in pages, flags, vec_len, max_pages, regions, walk_end in pages)
    ("same-start-end", 0, 0, 1000, 0, 0, 0),
    ("same-start-end-wp", 0, WP, 1000, 0, 0, 0),
    ("same-start-end-no-vec", 0, WP, 0, 0, 0, 0),
    ("big-vec", 1000, 0, 1000, 0, 1, 1000),
    ("vec-of-one", 1000, 0, 1, 0, 1, 1000),
    ("max-pages-all", 1000, 0, 1, 1000, 1, 1000),
    ("half-max-pages", 1000, 0, 1000, 500, 1, 500),
    ("one-max-page", 1000, 0, 1000, 1, 1, 1),
    ("max-pages-ulong", 1000, 0, 1000, ULONG_MAX, 1, 1000),
]


@pytest.mark.parametrize("length,flags,vec_len,max_pages,want,walk_end",
                         [c[1:] for c in WALK_END_DENSE], ids=[c[0] for c in WALK_END_DENSE])
def test_sd_walk_end_dense(env, length, flags, vec_len, max_pages, want, walk_end):
    """sanity_tests_sd() step 10: walk_end after scans of 1000 written pages."""
    n = 1000
    mem = env.map_anon(n)
    env.track(mem, n * P)
    kmem.memset(mem, 0, n * P)
    regions, end = env.scan(mem, length * P, flags=flags, req=WRITTEN, ret=WRITTEN,
                            vec_len=vec_len, max_pages=max_pages)
    assert len(regions) == want
    assert end == mem + walk_end * P


WALK_END_SPARSE = [
    # (id, vec_len, max_pages, regions, walk_end in pages)
    ("big-vec", 1000, 0, 500, 1000),
    ("vec-of-one", 1, 0, 1, 2),
    ("vec-of-one-max-pages", 1, 1000, 1, 2),
    ("half-vec-max-pages", 500, 1000, 500, 1000),
    ("max-pages", 1000, 1000, 500, 1000),
    ("half-max-pages", 1000, 500, 500, 1000),
    ("one-max-page", 1000, 1, 1, 2),
]


@pytest.mark.parametrize("vec_len,max_pages,want,walk_end",
                         [c[1:] for c in WALK_END_SPARSE], ids=[c[0] for c in WALK_END_SPARSE])
def test_sd_walk_end_sparse(env, vec_len, max_pages, want, walk_end):
    """sanity_tests_sd() step 10 (sparse): walk_end with every other page written."""
    n = 1000
    mem = env.map_anon(n)
    env.track(mem, n * P)
    kmem.memset(mem, 0, n * P)
    env.wp_reset(mem, n * P)
    write_pages(mem, range(0, n, 2))
    regions, end = env.scan(mem, n * P, req=WRITTEN, ret=WRITTEN, vec_len=vec_len,
                            max_pages=max_pages)
    assert len(regions) == want
    assert all(npages(r) == 1 for r in regions)
    assert end == mem + walk_end * P


# --------------------------------------------------------------------------
# base_tests() over every memory type main() runs it on

MEM_KINDS = ["anon-10", "anon-5120", "thp-2M", "hugetlb-private-2M", "hugetlb-sysv-shm-2M",
             "hugetlb-memfd-shared-2M", "file-private-10", "memfd-private-10"]


def make_mem(env: Env, kind: str) -> tuple[int, int, int]:
    """(address, length, granule in pages) of the memory main() hands to base_tests()."""
    if kind == "anon-10":
        return env.map_anon(10), 10 * P, 1
    if kind == "anon-5120":
        return env.map_anon(512 * 10), 512 * 10 * P, 1
    if kind == "thp-2M":
        return env.map_thp(H), H, 1            # split on first write: page granular
    if kind == "hugetlb-private-2M":
        return env.map_hugetlb(H), H, HP
    if kind == "hugetlb-sysv-shm-2M":
        return env.map_hugetlb_shm(H), H, HP
    if kind == "hugetlb-memfd-shared-2M":
        return env.map_hugetlb_memfd(H), H, HP
    if kind == "file-private-10":
        fd = env.temp_file("pagemap_ioctl.tmp0", b"c" * (10 * P))
        return env.map_file_private(10, fd), 10 * P, 1
    if kind == "memfd-private-10":
        fd = kmem.memfd("pagemap_ioctl.tmp00", 10 * P)
        env.stack.callback(os.close, fd)
        os.pwrite(fd, b"c" * (10 * P), 0)
        return env.map_file_private(10, fd), 10 * P, 1
    raise AssertionError(kind)


def track_mem(env: Env, kind: str):
    mem, length, unit = make_mem(env, kind)
    if kind.startswith("hugetlb") and "private" not in kind and \
            not env.t.features & _core.FEATURE_WP_HUGETLBFS_SHMEM:
        pytest.skip("hugetlb shared mappings: userfaultfd lacks UFFD_FEATURE_WP_HUGETLBFS_SHMEM")
    return mem, length, unit, env.track(mem, length)


@pytest.mark.parametrize("kind", MEM_KINDS)
def test_base_raw(env, kind):
    """base_tests(): the six checks, with the selftest's raw PAGEMAP_SCAN calls."""
    mem, length, unit, _ = track_mem(env, kind)
    env.wp_reset(mem, length)
    n = length // P

    # 1. all new pages must not be written
    assert env.scan(mem, length, flags=WP, req=WRITTEN, ret=WRITTEN, vec_len=1,
                    max_pages=n - 2)[0] == []
    # 2. all pages must be written
    kmem.memset(mem, 0xFF, length)
    regions = env.written(mem, length, vec_len=1)
    assert len(regions) == 1 and regions[0][0] == mem and npages(regions[0]) == n
    # 3. all pages dirty other than first and the last one
    env.scan(mem, length, flags=WP, req=WRITTEN, ret=WRITTEN, vec_len=1)
    kmem.memset(mem + P, 0, length - 2 * P)
    regions, _ = env.scan(mem, length, flags=WP, req=WRITTEN, ret=WRITTEN, vec_len=1)
    assert len(regions) == 1 and n - 2 <= npages(regions[0]) <= n
    # ... and the WP scan cleared them
    assert env.written(mem, length, vec_len=1) == []
    # 4. only middle page dirty
    env.scan(mem, length, flags=WP, req=WRITTEN, ret=WRITTEN, vec_len=1)
    kmem.write_page(mem + n // 2 * P, 1)
    regions = env.written(mem, length, vec_len=n)
    assert len(regions) == 1 and npages(regions[0]) >= 1
    assert pages_of(regions, mem) == expand({n // 2}, unit)
    # 5. only two middle pages dirty, and walk over only those
    env.scan(mem, length, flags=WP, req=WRITTEN, ret=WRITTEN | HUGE, vec_len=1)
    write_pages(mem, (n // 2, n // 2 + 1), 2)
    regions, _ = env.scan(mem + n // 2 * P, 2 * P, req=WRITTEN, ret=WRITTEN | HUGE, vec_len=1)
    assert len(regions) == 1
    assert regions[0][0] == mem + n // 2 * P and npages(regions[0]) == 2


@pytest.mark.parametrize("kind", MEM_KINDS)
def test_base_tracker(env, kind):
    """base_tests() through Tracker.collect(): exact pages (whole huge pages for hugetlb)."""
    mem, length, unit, r = track_mem(env, kind)
    n = length // P

    d = env.t.collect(r)
    assert d.count == 0 and not d.lost
    kmem.memset(mem, 0xFF, length)
    assert env.t.collect(r).ranges() == [(0, n)]
    kmem.memset(mem + P, 0, length - 2 * P)
    assert set(env.t.collect(r).pages()) == expand(range(1, n - 1), unit)
    assert env.t.collect(r).count == 0
    kmem.write_page(mem + n // 2 * P, 1)
    assert set(env.t.collect(r).pages()) == expand({n // 2}, unit)
    write_pages(mem, (n // 2, n // 2 + 1), 2)
    d = env.t.collect(r)
    assert set(d.pages()) == expand({n // 2, n // 2 + 1}, unit) and not d.lost
    assert env.t.collect(r).count == 0


# --------------------------------------------------------------------------
# hpage_unit_tests(): 10 THPs

THP_N = 10


def thp_region(env: Env):
    length = THP_N * H
    mem = env.map_thp(length)
    env.track(mem, length)
    env.wp_reset(mem, length)
    return mem, length, length // P


def test_hpage_fresh_then_all_written(env):
    """hpage_unit_tests() steps 1-3: fresh THPs are clean; a full write is one WRITTEN region."""
    mem, length, n = thp_region(env)
    assert env.scan(mem, length, flags=WP, req=WRITTEN, ret=WRITTEN, vec_len=n)[0] == []
    assert env.written(mem, length, vec_len=n) == []
    kmem.memset(mem, 0xFF, length)
    regions, _ = env.scan(mem, length, flags=WP, req=WRITTEN, ret=WRITTEN, vec_len=n)
    assert regions == [(mem, mem + length, WRITTEN)]
    assert env.written(mem, length, vec_len=n) == []


def test_hpage_only_middle_page_written(env):
    """hpage_unit_tests() step 4: one write into a protected THP reports that page (the THP splits)."""
    mem, length, n = thp_region(env)
    r = env.t.regions[0]
    kmem.write_page(mem + n // 2 * P, 1)
    regions = env.written(mem, length, vec_len=n)
    assert len(regions) == 1 and npages(regions[0]) > 0
    # Stricter than the selftest: async WP splits the PMD, so exactly that page.
    d = env.t.collect(r)
    assert d.pages() == [n // 2] and not d.lost


def test_hpage_clear_first_half(env):
    """hpage_unit_tests() step 5: wp_addr_range over the first half leaves the second half written."""
    mem, length, n = thp_region(env)
    kmem.memset(mem, 0, length)
    env.wp_reset(mem, length // 2)
    regions = env.written(mem, length, vec_len=n)
    assert regions == [(mem + length // 2, mem + length, WRITTEN)]


def test_hpage_clear_first_half_limited_buffer(env):
    """hpage_unit_tests() step 6: a WP scan with max_pages = half clears exactly the first half."""
    mem, length, n = thp_region(env)
    kmem.memset(mem, 0, length)
    env.scan(mem, length, flags=WP, req=WRITTEN, ret=WRITTEN, vec_len=n, max_pages=n // 2)
    regions = env.written(mem, length, vec_len=n)
    assert regions == [(mem + length // 2, mem + length, WRITTEN)]


def test_hpage_clear_second_half(env):
    """hpage_unit_tests() step 7: a WP scan of the second half leaves the first half written."""
    mem, length, n = thp_region(env)
    kmem.memset(mem, 0xFF, length)
    env.scan(mem + length // 2, length // 2, flags=WP, req=WRITTEN, ret=WRITTEN, vec_len=n,
             max_pages=n // 2)
    regions = env.written(mem, length, vec_len=n)
    assert regions == [(mem, mem + length // 2, WRITTEN)]


def test_hpage_get_half_huge_page(env):
    """hpage_unit_tests() step 8: vec 1 + max_pages of half a THP splits it; the rest stays written."""
    mem, length, n = thp_region(env)
    kmem.memset(mem, 0xFF, length)
    half = HP // 2
    regions, walk_end = env.scan(mem, length, flags=WP, req=WRITTEN, ret=WRITTEN, vec_len=1,
                                 max_pages=half)
    assert regions == [(mem, mem + half * P, WRITTEN)] and walk_end == mem + half * P
    regions = env.written(mem, length, vec_len=n)
    assert len(regions) == 1 and npages(regions[0]) == (length - H // 2) // P
    assert regions[0][0] == mem + half * P


# --------------------------------------------------------------------------
# test_simple(), mprotect_tests()

def test_simple(env):
    """test_simple(): 100 rounds of clean / write / written on one page."""
    mem = env.map_anon(1)
    r = env.track(mem, P)
    for i in range(100):
        assert env.written(mem, P, vec_len=1) == [], f"written bit was 1, should be 0 (i={i})"
        assert env.t.collect(r).count == 0
        kmem.write_page(mem, i)
        assert len(env.written(mem, P, vec_len=1)) == 1, f"written bit was 0, should be 1 (i={i})"
        assert env.t.collect(r).pages() == [0]


def test_mprotect_remap_raw(env):
    """mprotect_tests(): MAP_FIXED remap of page 2, re-register, mprotect dance; writes seen."""
    mem = env.map_anon(2)
    r = env.track(mem, 2 * P)
    kmem.memset(mem, 1, 2 * P)
    regions = env.written(mem, 2 * P, vec_len=1)
    assert len(regions) == 1 and npages(regions[0]) == 2, "both pages written"
    env.wp_reset(mem, 2 * P)
    assert env.written(mem, 2 * P, vec_len=1) == [], "both pages are not written"

    kmem.mmap(P, flags=kmem.MAP_PRIVATE | kmem.MAP_ANONYMOUS | kmem.MAP_FIXED, addr=mem + P)
    # wp_init(mem2): our Tracker only registers whole regions, so the region is
    # registered again as a whole; page 1 was clean, so the state is the same.
    env.t.remove_range(r)
    env.track(mem, 2 * P)
    kmem.mprotect(mem, P, kmem.PROT_NONE)
    kmem.mprotect(mem, 2 * P, kmem.PROT_READ)
    kmem.mprotect(mem, 2 * P, kmem.PROT_READ | kmem.PROT_WRITE)
    kmem.memset(mem, 2, 2 * P)
    kmem.mprotect(mem, P, kmem.PROT_NONE)
    kmem.mprotect(mem, P, kmem.PROT_READ)
    kmem.mprotect(mem, P, kmem.PROT_READ | kmem.PROT_WRITE)
    regions = env.written(mem, 2 * P, vec_len=1)
    assert len(regions) == 1 and npages(regions[0]) == 2, "both pages written after remap and mprotect"

    env.wp_reset(mem, 2 * P)
    kmem.memset(mem, ord("A"), 2 * P)
    regions = env.written(mem, 2 * P, vec_len=1)
    assert len(regions) == 1 and npages(regions[0]) == 2, "clear and make the pages written"


def test_mprotect_remap_tracker(env):
    """mprotect_tests() through Tracker: the remap is reported lost, re-armed, then tracked exactly."""
    mem = env.map_anon(2)
    r = env.track(mem, 2 * P)
    kmem.memset(mem, 1, 2 * P)
    assert env.t.collect(r).pages() == [0, 1]
    assert env.t.collect(r).count == 0

    kmem.mmap(P, flags=kmem.MAP_PRIVATE | kmem.MAP_ANONYMOUS | kmem.MAP_FIXED, addr=mem + P)
    d = env.t.collect(r)
    assert d.lost and d.pages() == [0, 1], "page 2's new VMA is not registered: must be lost"
    assert r.state == "tracking", f"the tracker should have re-armed the region: {r.lost_reason}"

    kmem.mprotect(mem, P, kmem.PROT_NONE)
    kmem.mprotect(mem, 2 * P, kmem.PROT_READ)
    kmem.mprotect(mem, 2 * P, kmem.PROT_READ | kmem.PROT_WRITE)
    assert env.t.collect(r).count == 0, "mprotect alone is not a write"
    kmem.memset(mem, 2, 2 * P)
    kmem.mprotect(mem, P, kmem.PROT_NONE)
    kmem.mprotect(mem, P, kmem.PROT_READ)
    kmem.mprotect(mem, P, kmem.PROT_READ | kmem.PROT_WRITE)
    d = env.t.collect(r)
    assert d.pages() == [0, 1] and not d.lost
    kmem.memset(mem, ord("A"), 2 * P)
    d = env.t.collect(r)
    assert d.pages() == [0, 1] and not d.lost
    assert env.t.collect(r).count == 0


# --------------------------------------------------------------------------
# transact_test()

NTHREADS, PAGES_PER_THREAD, ACCESS_PER_THREAD, ROUNDS = 6, 32, 8, 1000


@pytest.mark.timeout(90)
@pytest.mark.parametrize("scanner", ["tracker", "raw"])
def test_transact(env, scanner):
    """transact_test(): writers race a get-and-reset scan; no update may be lost over 1000 rounds."""
    total = NTHREADS * PAGES_PER_THREAD
    mem = env.map_anon(total)
    r = env.track(mem, total * P)
    expected = {t * PAGES_PER_THREAD + i for t in range(NTHREADS) for i in range(ACCESS_PER_THREAD)}

    def get_dirty_pages_reset() -> set[int]:
        if scanner == "tracker":
            d = env.t.collect(r)
            assert not d.lost, d.lost_reason
            return set(d.pages())
        regions, _ = env.scan(mem, total * P, flags=WP, req=WRITTEN, ret=WRITTEN, vec_len=256,
                              max_pages=total)
        assert all(cat == WRITTEN for _, _, cat in regions), "wrong flags"
        return pages_of(regions, mem)

    kmem.memset(mem, 0, total * P)
    assert len(get_dirty_pages_reset()) == total
    assert get_dirty_pages_reset() == set()

    start, end = threading.Barrier(NTHREADS + 1), threading.Barrier(NTHREADS + 1)
    short_faults: list[str] = []
    faults_seen = [0] * NTHREADS
    stop = threading.Event()

    def writer(t: int) -> None:
        base = mem + t * PAGES_PER_THREAD * P
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        value = 0
        try:
            while True:
                start.wait()
                if stop.is_set():
                    return
                value = (value + 1) & 0xFF
                # One foreign call without the GIL: the 8 page writes really
                # run while the main thread's scan runs.
                kmem.memset(base, value, ACCESS_PER_THREAD * P)
                end.wait()
                now = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
                if now - before < ACCESS_PER_THREAD:
                    short_faults.append(f"thread {t}: {now - before} faults for "
                                        f"{ACCESS_PER_THREAD} protected pages")
                faults_seen[t] += now - before
                before = now
        except threading.BrokenBarrierError:
            return

    threads = [threading.Thread(target=writer, args=(t,), daemon=True) for t in range(NTHREADS)]
    for th in threads:
        th.start()
    extra = overlapped = 0
    deadline = time.monotonic() + 60
    try:
        for i in range(ROUNDS):
            start.wait(timeout=10)
            during = get_dirty_pages_reset()
            end.wait(timeout=10)
            after = get_dirty_pages_reset()
            assert during <= expected, f"round {i}: unwritten pages reported {during - expected}"
            assert after <= expected, f"round {i}: unwritten pages reported {after - expected}"
            assert during | after == expected, f"round {i}: lost updates {expected - (during | after)}"
            extra += len(during & after)
            overlapped += 0 < len(during) < len(expected)
            assert time.monotonic() < deadline, f"too slow: {i} rounds in 60 s"
        stop.set()
        start.wait(timeout=10)          # release the writers: they see stop and return
    finally:
        start.abort()                   # on failure: wake writers out of their barrier
        end.abort()
        for th in threads:
            th.join(timeout=10)
    assert not any(th.is_alive() for th in threads)
    # Each round every writer touched 8 write-protected pages, so its writes
    # faulted: proof the protection was in place. Fault accounting is not
    # exact (a handful per thousand go uncounted on this kernel), so this is a
    # bound, not an equality; lost updates are checked exactly above.
    assert min(faults_seen) >= 0.9 * ROUNDS * ACCESS_PER_THREAD, (faults_seen, short_faults[:3])
    # Reported twice is tolerated (selftest: "extra pages"), but not everywhere.
    assert extra < ROUNDS * len(expected)
    if (os.cpu_count() or 1) > 1:
        assert overlapped > 0, "no scan ever ran while the writers wrote: the race was not exercised"
    print(f"transact[{scanner}]: {extra} pages reported twice, {overlapped} rounds where "
          "the scan caught the writers mid-way")


# --------------------------------------------------------------------------
# sanity_tests()

def test_sanity_mask_combinations_accepted(env):
    """sanity_tests() step 1: WP with !WRITTEN masks, required/anyof/excluded masks are all valid."""
    mem = env.map_anon(10)
    env.track(mem, 10 * P)
    env.wp_reset(mem, 10 * P)
    # No page has every category at once: required=ALL matches nothing.
    for kw in (dict(flags=WP, req=BITS_ALL), dict(req=BITS_ALL),
               dict(req=BITS_ALL, anyof=BITS_ALL)):
        assert env.scan(mem, 10 * P, ret=BITS_ALL, vec_len=10, **kw) == ([], mem + 10 * P), kw
    # Fresh, never-touched tracked pages: WPALLOWED, neither WRITTEN nor
    # PRESENT. (6.18 also reports the uffd-wp pte markers as SWAPPED; not
    # asserted, it is an artefact of markers being swap-type entries.)
    for kw in (dict(anyof=BITS_ALL), dict(excl=BITS_ALL)):
        regions, walk_end = env.scan(mem, 10 * P, ret=BITS_ALL, vec_len=10, **kw)
        assert walk_end == mem + 10 * P
        assert len(regions) == 1 and regions[0][:2] == (mem, mem + 10 * P), kw
        assert regions[0][2] & (WPALLOWED | WRITTEN | PRESENT) == WPALLOWED, kw


def test_sanity_required_anyof_inverted(env):
    """sanity_tests() steps 2-6: anyof / required / inverted masks over written, present pages."""
    n = 10
    mem = env.map_anon(n)
    env.track(mem, n * P)
    env.wp_reset(mem, n * P)
    kmem.memset(mem, 0, n * P)
    want = WRITTEN | PRESENT

    regions, _ = env.scan(mem, n * P, anyof=BITS_ALL, ret=BITS_ALL, vec_len=n)
    assert len(regions) == 1 and regions[0][0] == mem and npages(regions[0]) == n
    assert regions[0][2] & want == want
    assert regions[0][2] & WPALLOWED, "a tracked VMA is WPALLOWED"
    # Step 3 requires *every* category at once, which no page can have
    # (PRESENT and SWAPPED exclude each other). The C test passes only because
    # it re-reads the vector of step 2; the kernel answer is no region.
    assert env.scan(mem, n * P, req=BITS_ALL, ret=BITS_ALL, vec_len=n)[0] == []
    assert env.scan(mem, n * P, req=want, ret=BITS_ALL, vec_len=n)[0] == regions
    regions, _ = env.scan(mem, n * P, req=WRITTEN, anyof=PRESENT, ret=BITS_ALL, vec_len=n)
    assert len(regions) == 1 and regions[0][0] == mem and npages(regions[0]) == n
    assert regions[0][2] & want == want
    assert env.scan(mem, n * P, req=WRITTEN, excl=WRITTEN, ret=BITS_ALL, vec_len=n)[0] == [], \
        "don't get written pages"
    assert env.scan(mem, n * P, req=PRESENT, excl=PRESENT, ret=BITS_ALL, vec_len=n)[0] == [], \
        "don't get present pages"


def test_sanity_wp_with_return_mask(env):
    """sanity_tests() step 8: a WP scan with anyof=ALL returns only the WRITTEN bit, then resets."""
    n = 10
    mem = env.map_anon(n)
    r = env.track(mem, n * P)
    env.wp_reset(mem, n * P)
    kmem.memset(mem, 0, n * P)
    regions, _ = env.scan(mem, n * P, flags=WP, anyof=BITS_ALL, ret=WRITTEN, vec_len=n)
    assert regions == [(mem, mem + n * P, WRITTEN)]
    assert env.t.collect(r).count == 0, "the generic-path WP scan must have re-protected every page"


def test_sanity_file_ro_mapping(env):
    """sanity_tests() step 9: a read mapping of a file reports PRESENT|FILE pages."""
    with open(__file__, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        fmem = env.map(size, prot=kmem.PROT_READ, flags=kmem.MAP_PRIVATE, fd=f.fileno())
    assert ctypes.string_at(fmem, size)[:3] == b'"""'      # reads every page
    regions, _ = env.scan(fmem, size, anyof=NON_WRITTEN_BITS, ret=NON_WRITTEN_BITS, vec_len=10)
    assert regions[0][0] == fmem
    assert npages(regions[0]) == math.ceil(size / P)
    assert regions[0][2] & FILE and regions[0][2] & PRESENT


def test_sanity_file_rw_private_written(env):
    """sanity_tests() step 10: writes to a private file mapping are WRITTEN (and collected)."""
    n = 10
    fd = env.temp_file("pagemap_ioctl.tmp2", b"c" * (n * P))
    fmem = env.map_file_private(n, fd)
    r = env.track(fmem, n * P)
    env.wp_reset(fmem, n * P)
    kmem.memset(fmem, ord("z"), n * P)
    regions, _ = env.scan(fmem, n * P, req=WRITTEN, anyof=PRESENT | SWAPPED | FILE,
                          ret=BITS_ALL, vec_len=n)
    assert regions[0][0] == fmem and npages(regions[0]) == n and regions[0][2] & WRITTEN
    assert env.t.collect(r).ranges() == [(0, n)]
    assert os.pread(fd, 3, 0) == b"ccc", "MAP_PRIVATE writes must not reach the file"


# --------------------------------------------------------------------------
# unmapped_region_tests(), userfaultfd_tests(), zeropfn_tests()

def test_unmapped_region_scan_is_empty(env):
    """unmapped_region_tests(): a scan of an unmapped range succeeds and finds nothing."""
    length = 64 * P
    hole = kmem.mmap(length, prot=kmem.PROT_NONE)
    kmem.munmap(hole, length)           # a range known to be unmapped
    regions, walk_end = env.scan(hole, length, req=NON_WRITTEN_BITS, ret=NON_WRITTEN_BITS,
                                 vec_len=64)
    assert regions == [] and walk_end == hole + length
    # A hole is skipped silently even with CHECK_WPASYNC: only VMAs are checked.
    assert env.scan(hole, length, flags=WP, req=WRITTEN, ret=WRITTEN) == ([], hole + length)


def test_tracker_hole_in_region_is_lost(env):
    """unmapped_region_tests() corollary: holes scan as nothing, so the Tracker must call them lost."""
    n = 8
    mem = env.map_anon(n)
    r = env.track(mem, n * P)
    kmem.write_page(mem + 6 * P)
    kmem.munmap(mem + 3 * P, P)
    assert pages_of(env.written(mem, n * P), mem) == {6}, "the kernel skips the hole"
    d = env.t.collect(r)
    assert d.lost and d.count == n and f"{mem + 3 * P:#x}" in d.lost_reason
    with pytest.raises(InvalidRange):
        env.t.add_range(mem + 2 * P, 3 * P)     # refuses a range with a hole


def test_userfaultfd_prot_none_mixed_mprotect(env):
    """userfaultfd_tests(): PROT_NONE pages under mixed mprotect scan as not written."""
    n = 16
    size = n * P
    mem = env.map(size, prot=kmem.PROT_NONE)
    r = env.track(mem, size)
    prots = [kmem.PROT_READ | kmem.PROT_WRITE, kmem.PROT_READ] * 2 + \
            [kmem.PROT_READ | kmem.PROT_WRITE, kmem.PROT_NONE,
             kmem.PROT_READ | kmem.PROT_WRITE, kmem.PROT_READ]
    for i, prot in enumerate(prots):
        kmem.mprotect(mem + i * size // 8, size // 8, prot)
    env.wp_reset(mem + size // 16, size - 2 * (size // 8))
    env.wp_reset(mem, size)
    regions, _ = env.scan(mem, size, flags=WP, req=WRITTEN, ret=WRITTEN, vec_len=1,
                          max_pages=n - 2)
    assert regions == [], "all new pages must not be written"
    assert env.t.collect(r).count == 0

    # Beyond the selftest: writes into the read-write chunks are tracked
    # across the VMAs mprotect split the region into.
    rw = [i for i, prot in enumerate(prots) if prot & kmem.PROT_WRITE]
    wrote = sorted(2 * i + 1 for i in rw)
    write_pages(mem, wrote)
    d = env.t.collect(r)
    assert d.pages() == wrote and not d.lost


@pytest.mark.parametrize("registered", [False, True], ids=["plain", "tracked"])
def test_zeropfn_read_touched_pages(env, registered):
    """zeropfn_tests(): read-faulted PROT_READ anonymous pages map the zero page (PFNZERO)."""
    n = 10
    mem = env.map(n * P, prot=kmem.PROT_READ)
    kmem.madvise(mem, n * P, kmem.MADV_NOHUGEPAGE)
    if registered:
        r = env.track(mem, n * P)
    for i in range(n):
        assert kmem.read_byte(mem + i * P) == 0
    regions, _ = env.scan(mem, n * P, req=PFNZERO, ret=PFNZERO, vec_len=1, max_pages=n)
    assert regions == [(mem, mem + n * P, PFNZERO)]
    if registered:
        assert env.t.collect(r).count == 0, "reads are not writes"


def test_zeropfn_huge_zero_page(env):
    """zeropfn_tests(): a read-faulted MADV_HUGEPAGE range maps the huge zero page (PFNZERO)."""
    require_thp()
    try:
        with open(THP_ZERO_PAGE) as f:
            use_zero_page = f.read().strip()
    except OSError:
        use_zero_page = None
    if use_zero_page != "1":
        pytest.skip(f"huge zero page: {THP_ZERO_PAGE} is {use_zero_page!r}, not 1")
    mem = kmem.mmap_aligned(H, H, prot=kmem.PROT_READ)
    env._unmap_later(mem, H)
    kmem.madvise(mem, H, kmem.MADV_HUGEPAGE)
    assert kmem.read_byte(mem) == 0
    regions, _ = env.scan(mem, H, req=PFNZERO, ret=PFNZERO | HUGE, vec_len=1)
    assert regions == [(mem, mem + H, PFNZERO | HUGE)]


# --------------------------------------------------------------------------
# Newer selftest cases and kernel facts the tracker depends on

def test_unpopulated_after_dontneed_paths_agree(env):
    """unpopulated_scan_test() (mm-hotfixes, after 6.18): a zapped range reads alike on both scan paths."""
    n = 16
    mem = env.map_anon(n)
    r = env.track(mem, n * P)
    kmem.memset(mem, 1, n * P)
    kmem.madvise(mem, n * P, kmem.MADV_DONTNEED)
    fast = pages_of(env.scan(mem, n * P, req=WRITTEN, ret=WRITTEN, vec_len=n)[0], mem)
    generic = pages_of(env.scan(mem, n * P, anyof=WRITTEN, ret=WRITTEN, vec_len=n)[0], mem)
    assert fast == generic, f"fast path {sorted(fast)} vs generic path {sorted(generic)}"
    # The tracker scans on the fast path: the zapped pages (now zero) are
    # written, and the scan re-arms them.
    d = env.t.collect(r)
    assert d.ranges() == [(0, n)] and not d.lost
    assert env.t.collect(r).count == 0
    kmem.write_page(mem + 5 * P)
    assert env.t.collect(r).pages() == [5]


def test_check_wpasync_on_unregistered_vma(env):
    """pagemap_scan_test_walk(): CHECK_WPASYNC -> EPERM, WP alone -> skip, no WP -> walked."""
    n = 4
    mem = env.map_anon(n)
    kmem.memset(mem, 1, n * P)
    with pytest.raises(OSError) as exc:
        env.scan(mem, n * P, flags=WP, req=WRITTEN, ret=WRITTEN)
    assert exc.value.errno == errno.EPERM
    assert env.scan(mem, n * P, flags=_core.SCAN_WP_MATCHING, req=WRITTEN, ret=WRITTEN) == \
        ([], mem + n * P)
    regions, _ = env.scan(mem, n * P, anyof=PRESENT, ret=PRESENT | WPALLOWED)
    assert regions == [(mem, mem + n * P, PRESENT)], "not WPALLOWED: not registered"


def test_hugetlb_partial_wp_makes_no_progress(env):
    """base_tests() on hugetlb, kernel fact: a WP scan cannot cut a huge page; Tracker needs alignment."""
    mem = env.map_hugetlb(H)
    with pytest.raises(InvalidRange) as exc:
        env.t.add_range(mem, P)
    assert exc.value.errno == errno.EINVAL
    r = env.track(mem, H)
    kmem.write_page(mem + 100 * P)
    # Partial range or partial max_pages: backed out, walk_end stays at start.
    assert env.scan(mem + P, P, flags=WP, req=WRITTEN, ret=WRITTEN) == ([], mem + P)
    assert env.scan(mem, H, flags=WP, req=WRITTEN, ret=WRITTEN, max_pages=HP - 1) == ([], mem)
    assert npages(env.written(mem, H)[0]) == HP, "nothing was reset"
    d = env.t.collect(r)
    assert d.ranges() == [(0, HP)] and not d.lost
    assert env.t.collect(r).count == 0
