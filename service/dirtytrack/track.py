"""In-process tracking of a Python buffer: ``with dirtytrack.track(buf) as t``."""
from __future__ import annotations

from dirtytrack._core import PAGE_SIZE, DirtySet, Region, Tracker, writable_span
from dirtytrack.errors import InvalidRange

__all__ = ["BufferTracker", "track"]


class BufferTracker:
    """Tracks the pages that hold a writable buffer (bytearray, mmap, numpy array...).

    Page 0 is the page that holds ``buf[0]``; ``offset`` is where ``buf[0]``
    sits inside it. The buffer is pinned (it cannot be resized or closed)
    until the tracker is closed. Pages shared with neighbouring data (a small
    bytearray on the heap) are reported when the neighbours are written too:
    page-aligned buffers such as ``mmap`` give exact sets.
    """

    def __init__(self, buf, tracker: Tracker | None = None):
        view = memoryview(buf)
        if view.readonly:
            view.release()
            raise InvalidRange(f"cannot track a read-only {type(buf).__name__}: "
                               "nothing can write to it")
        if view.nbytes == 0:
            view.release()
            raise InvalidRange(f"cannot track an empty {type(buf).__name__}")
        address, length = writable_span(view)
        first_page = address - address % PAGE_SIZE
        end = -(-(address + length) // PAGE_SIZE) * PAGE_SIZE
        self._owns_tracker = tracker is None
        self._tracker = Tracker() if tracker is None else tracker
        try:
            self.region: Region = self._tracker.add_range(first_page, end - first_page)
        except BaseException:
            view.release()
            if self._owns_tracker:
                self._tracker.close()
            raise
        self._view = view
        self.address = first_page
        self.offset = address - first_page
        self.npages = self.region.npages
        self.page_size = PAGE_SIZE

    def collect(self) -> DirtySet:
        """Pages written since the previous collect (or since tracking began)."""
        if self._view is None:
            from dirtytrack.errors import TrackerClosed
            raise TrackerClosed("this buffer is no longer tracked (the tracker was closed)")
        return self._tracker.collect(self.region)

    def close(self) -> None:
        """Stop tracking and release the buffer. Safe to call twice."""
        if self._view is None:
            return
        if self._owns_tracker:
            self._tracker.close()
        elif not self._tracker.closed:
            self._tracker.remove_range(self.region)
        self._view.release()
        self._view = None

    @property
    def closed(self) -> bool:
        return self._view is None

    def __enter__(self) -> "BufferTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._view is None else f"{self.npages} pages at {self.address:#x}"
        return f"<BufferTracker {state}>"


def track(buf) -> BufferTracker:
    """Track writes to `buf`; use as a context manager, read with collect()."""
    return BufferTracker(buf)
