"""Bad input gets a clear exception naming the cause; nothing crashes."""
import mmap
import os

import pytest

import dirtytrack
import kmem
from dirtytrack import InvalidRange, RangeBusy, Tracker, TrackerClosed

PAGE = kmem.PAGE


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def test_track_mmap_buffer_exact():
    m = mmap.mmap(-1, 32 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with dirtytrack.track(m) as t:
        assert t.offset == 0 and t.npages == 32
        m[5 * PAGE] = 1
        m[31 * PAGE + 7] = 1
        d = t.collect()
        assert d.pages() == [5, 31] and d.count == 2 and d.ranges() == [(5, 6), (31, 32)]
        assert t.collect().pages() == []
    m.close()


def test_track_bytearray_reports_its_pages():
    buf = bytearray(3 * PAGE + 100)
    with dirtytrack.track(buf) as t:
        buf[0] = 1
        buf[-1] = 1
        got = t.collect().pages()
        first, last = 0, (t.offset + len(buf) - 1) // PAGE
        assert first in got and last in got


@pytest.mark.parametrize("buf", [b"abc" * 5000, memoryview(b"x" * 9000)])
def test_read_only_buffer_refused(buf):
    with pytest.raises(InvalidRange, match="read-only"):
        dirtytrack.track(buf)


def test_empty_buffer_refused():
    with pytest.raises(InvalidRange, match="empty"):
        dirtytrack.track(bytearray())


def test_non_buffer_refused():
    with pytest.raises(TypeError):
        dirtytrack.track(12345)


def test_tracked_buffer_is_pinned():
    """It cannot be resized or closed under the tracker (no use after free)."""
    buf = bytearray(4 * PAGE)
    m = mmap.mmap(-1, 4 * PAGE)
    with dirtytrack.track(buf), dirtytrack.track(m):
        with pytest.raises(BufferError):
            buf.extend(b"x" * PAGE)
        with pytest.raises(BufferError):
            m.close()
    buf.extend(b"x")        # released once tracking ends
    m.close()


@pytest.mark.parametrize("start_off,length", [(1, PAGE), (0, PAGE + 1), (0, 0), (0, -PAGE)])
def test_unaligned_or_empty_ranges_refused(anon, tracker, start_off, length):
    base = anon(4)
    with pytest.raises(InvalidRange):
        tracker.add_range(base + start_off, length)


def test_range_beyond_address_space_refused(tracker):
    with pytest.raises(InvalidRange):
        tracker.add_range((1 << 64) - PAGE, 2 * PAGE)
    with pytest.raises(InvalidRange):
        tracker.add_range(-PAGE, PAGE)
    with pytest.raises(InvalidRange):
        tracker.add_range("0x1000", PAGE)


def test_unmapped_range_refused_with_maps_hint(tracker):
    addr = kmem.mmap(4 * PAGE)
    kmem.munmap(addr, 4 * PAGE)
    with pytest.raises(InvalidRange, match="nothing is mapped"):
        tracker.add_range(addr, 4 * PAGE)


def test_partly_unmapped_range_refused(anon, tracker):
    base = anon(4)
    kmem.munmap(base + 2 * PAGE, PAGE)
    with pytest.raises(InvalidRange, match=hex(base + 2 * PAGE)):
        tracker.add_range(base, 4 * PAGE)


def test_overlapping_range_refused(anon, tracker):
    base = anon(8)
    tracker.add_range(base, 4 * PAGE)
    with pytest.raises(InvalidRange, match="overlaps"):
        tracker.add_range(base + 3 * PAGE, 2 * PAGE)


def test_range_of_another_tracker_is_busy(anon, tracker):
    base = anon(4)
    tracker.add_range(base, 4 * PAGE)
    with Tracker() as other:
        with pytest.raises(RangeBusy, match="already tracked"):
            other.add_range(base, 4 * PAGE)


def test_closed_tracker_refuses_work_and_close_is_idempotent(anon):
    base = anon(4)
    before = open_fds()
    t = Tracker()
    region = t.add_range(base, 4 * PAGE)
    t.close()
    t.close()
    assert t.closed
    assert open_fds() == before, "closing must release every fd"
    with pytest.raises(TrackerClosed):
        t.collect(region)
    with pytest.raises(TrackerClosed):
        t.add_range(base, 4 * PAGE)
    # the range is free again for a new tracker
    with Tracker() as again:
        again.add_range(base, 4 * PAGE)


def test_buffer_tracker_double_close_and_collect_after_close():
    m = mmap.mmap(-1, 4 * PAGE)
    t = dirtytrack.track(m)
    t.close()
    t.close()
    with pytest.raises(TrackerClosed):
        t.collect()
    m.close()


def test_removed_region_refused(anon, tracker):
    base = anon(4)
    region = tracker.add_range(base, 4 * PAGE)
    tracker.remove_range(region)
    assert region.state == "removed"
    with pytest.raises(InvalidRange, match="not tracked"):
        tracker.collect(region)
    with pytest.raises(InvalidRange):
        tracker.remove_range(region)


def test_regions_from_another_tracker_refused(anon, tracker):
    base = anon(4)
    with Tracker() as other:
        region = other.add_range(base, 4 * PAGE)
        with pytest.raises(InvalidRange):
            tracker.collect(region)


def test_adopting_a_handshaken_fd_without_saying_so_is_explained():
    from dirtytrack import _core
    with Tracker() as t:
        dup = os.dup(t.fileno())
        with pytest.raises(dirtytrack.DirtytrackError, match="handshake=False"):
            Tracker(uffd=dup)
        # With handshake=False the same fd is adopted and works.
        base = kmem.mmap(4 * PAGE)
        try:
            adopted = Tracker(uffd=os.dup(t.fileno()), handshake=False)
            region = adopted.add_range(base, 4 * PAGE)
            kmem.write_page(base + PAGE)
            assert adopted.collect(region).pages() == [1]
            adopted.close()
        finally:
            kmem.munmap(base, 4 * PAGE)
    assert _core.PAGE_SIZE == PAGE


def test_many_trackers_do_not_leak_fds(anon):
    base = anon(4)
    before = open_fds()
    for _ in range(200):
        t = Tracker()
        t.add_range(base, 4 * PAGE)
        del t                      # closed by the finaliser, not by close()
    assert open_fds() == before
