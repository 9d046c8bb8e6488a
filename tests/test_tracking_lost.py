"""Every way tracking can be lost ends in an honest report, never a smaller set.

Cases from the kernel notes: mremap, munmap, munmap + mmap at the same place,
MADV_DONTNEED, fork, writes by the kernel, shared memory.
"""
import ctypes
import os

import pytest

import kmem
from dirtytrack import Tracker

PAGE = kmem.PAGE


def assert_whole_and_lost(d, npages, words):
    assert d.lost, "a lost region must be reported as lost"
    assert d.count == npages, "a lost region must be reported whole"
    for word in words:
        assert word in d.lost_reason


def test_mremap_away_reports_lost_whole(anon, tracker):
    base = anon(16)
    region = tracker.add_range(base, 16 * PAGE)
    kmem.write_page(base)
    moved = kmem.mremap(base, 16 * PAGE, 16 * PAGE, kmem.MREMAP_MAYMOVE | kmem.MREMAP_FIXED,
                        kmem.mmap(16 * PAGE))
    try:
        d = tracker.collect(region)
        assert_whole_and_lost(d, 16, ["lost"])
        assert region.state == "lost"       # nothing mapped there any more
        assert tracker.collect(region).lost  # and it keeps saying so
    finally:
        kmem.munmap(moved, 16 * PAGE)


def test_munmap_reports_lost_whole(tracker):
    base = kmem.mmap(8 * PAGE)
    region = tracker.add_range(base, 8 * PAGE)
    kmem.munmap(base, 8 * PAGE)
    d = tracker.collect(region)
    assert_whole_and_lost(d, 8, ["unmap"])


def test_partial_munmap_reports_lost_whole(anon, tracker):
    base = anon(8)
    region = tracker.add_range(base, 8 * PAGE)
    kmem.munmap(base + 3 * PAGE, PAGE)
    assert_whole_and_lost(tracker.collect(region), 8, [hex(base + 3 * PAGE)])


def test_munmap_then_mmap_same_place_is_lost_then_rearmed(anon, tracker):
    base = anon(8)
    region = tracker.add_range(base, 8 * PAGE)
    kmem.munmap(base, 8 * PAGE)
    kmem.mmap(8 * PAGE, flags=kmem.MAP_PRIVATE | kmem.MAP_ANONYMOUS | kmem.MAP_FIXED, addr=base)
    kmem.write_page(base + 2 * PAGE)
    d = tracker.collect(region)
    assert_whole_and_lost(d, 8, ["no longer registered"])
    # The new mapping is tracked from that report on: exact again.
    assert region.state == "tracking"
    kmem.write_page(base + 5 * PAGE)
    d = tracker.collect(region)
    assert not d.lost and d.pages() == [5]


def test_mremap_in_place_shrink_reports_lost(anon, tracker):
    base = anon(8)
    region = tracker.add_range(base, 8 * PAGE)
    kmem.mremap(base, 8 * PAGE, 4 * PAGE, 0)
    assert_whole_and_lost(tracker.collect(region), 8, ["lost"])


def test_mprotect_keeps_tracking_exact(anon, tracker):
    base = anon(4)
    region = tracker.add_range(base, 4 * PAGE)
    kmem.mprotect(base + PAGE, PAGE, kmem.PROT_READ)
    kmem.mprotect(base + PAGE, PAGE, kmem.PROT_NONE)
    kmem.mprotect(base + PAGE, PAGE, kmem.PROT_READ | kmem.PROT_WRITE)
    kmem.write_page(base + PAGE)
    d = tracker.collect(region)
    assert not d.lost and d.pages() == [1]


def test_dontneed_of_clean_page_is_reported(anon, tracker):
    """Its content became zero: that is a write a migration must copy."""
    base = anon(8)
    kmem.memset(base, 0x5A, 8 * PAGE)
    region = tracker.add_range(base, 8 * PAGE)
    kmem.madvise(base + 2 * PAGE, PAGE, kmem.MADV_DONTNEED)
    assert tracker.collect(region).pages() == [2]
    assert tracker.collect(region).pages() == []


def test_dontneed_of_whole_page_table_is_reported(tracker):
    """A whole 2 MiB-aligned range zapped at once (the kernel may free the page
    table itself): still reported."""
    base = kmem.mmap_aligned(4 << 20, 2 << 20)
    try:
        kmem.madvise(base, 4 << 20, kmem.MADV_NOHUGEPAGE)
        kmem.memset(base, 1, 4 << 20)
        region = tracker.add_range(base, 4 << 20)
        kmem.madvise(base, 2 << 20, kmem.MADV_DONTNEED)
        assert tracker.collect(region).ranges() == [(0, 512)]
    finally:
        kmem.munmap(base, 4 << 20)


def test_fork_child_writes_are_not_ours_parent_cow_is(anon, tracker):
    base = anon(4)
    kmem.memset(base, 1, 4 * PAGE)
    region = tracker.add_range(base, 4 * PAGE)
    pid = os.fork()
    if pid == 0:
        kmem.write_page(base + PAGE, 9)   # the child's own copy
        os._exit(0)
    os.waitpid(pid, 0)
    assert tracker.collect(region).pages() == []
    kmem.write_page(base + 3 * PAGE, 7)   # copy-on-write in the parent
    assert tracker.collect(region).pages() == [3]


def test_kernel_mode_writes_are_reported(anon, tracker):
    """read(2) into the buffer and writes through /proc/self/mem fault too."""
    base = anon(4)
    region = tracker.add_range(base, 4 * PAGE)
    r, w = os.pipe()
    os.write(w, b"x" * 100)
    view = (ctypes.c_char * PAGE).from_address(base + PAGE)
    assert os.readv(r, [view]) == 100
    os.close(r)
    os.close(w)
    with open("/proc/self/mem", "r+b", buffering=0) as mem:
        mem.seek(base + 3 * PAGE)
        mem.write(b"y")
    assert tracker.collect(region).pages() == [1, 3]


def test_shared_memfd_tracked_mapping_reported_second_mapping_not():
    """Tracking is per page table: a second mapping of the same memfd, or
    pwrite(2), is invisible (documented limitation; track every mapper)."""
    fd = kmem.memfd(size=4 * PAGE)
    a = kmem.mmap(4 * PAGE, flags=kmem.MAP_SHARED, fd=fd)
    b = kmem.mmap(4 * PAGE, flags=kmem.MAP_SHARED, fd=fd)
    try:
        with Tracker() as t:
            region = t.add_range(a, 4 * PAGE)
            kmem.write_page(a + PAGE)
            kmem.write_page(b + 2 * PAGE)
            os.pwrite(fd, b"z", 3 * PAGE)
            assert t.collect(region).pages() == [1]
    finally:
        kmem.munmap(a, 4 * PAGE)
        kmem.munmap(b, 4 * PAGE)
        os.close(fd)


def test_hugetlb_write_reports_the_whole_huge_page(hugepages, tracker):
    hugepages(2)
    length = 4 << 20
    base = kmem.mmap(length, flags=kmem.MAP_PRIVATE | kmem.MAP_ANONYMOUS | kmem.MAP_HUGETLB)
    try:
        region = tracker.add_range(base, length)
        kmem.write_page(base + (2 << 20) + 5 * PAGE)
        assert tracker.collect(region).ranges() == [(512, 1024)]
        assert tracker.collect(region).ranges() == []
    finally:
        kmem.munmap(base, length)


def test_thp_write_is_tracked_at_4k(tracker):
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        if "[never]" in f.read():
            pytest.skip("transparent huge pages are disabled on this kernel ([never])")
    base = kmem.mmap_aligned(2 << 20, 2 << 20)
    try:
        kmem.madvise(base, 2 << 20, kmem.MADV_HUGEPAGE)
        kmem.memset(base, 1, 2 << 20)
        region = tracker.add_range(base, 2 << 20)
        kmem.write_page(base + 77 * PAGE)
        assert tracker.collect(region).pages() == [77]
    finally:
        kmem.munmap(base, 2 << 20)


def test_maps_text_gap_check_agrees_with_procmap_query(anon, tracker):
    """The pre-6.11 fallback (first_gap over /proc/self/maps) finds the hole the
    PROCMAP_QUERY path reports."""
    from dirtytrack.maps import first_gap, read_maps
    base = anon(8)
    region = tracker.add_range(base, 8 * PAGE)
    fd = os.open("/proc/self/maps", os.O_RDONLY)
    try:
        assert first_gap(read_maps(fd), base, base + 8 * PAGE) is None
        kmem.munmap(base + 3 * PAGE, PAGE)
        assert first_gap(read_maps(fd), base, base + 8 * PAGE) == base + 3 * PAGE
    finally:
        os.close(fd)
    assert hex(base + 3 * PAGE) in tracker.collect(region).lost_reason
