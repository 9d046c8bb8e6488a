# runs.pxi - RunList: sorted, non-overlapping, non-adjacent page runs.
# PAGEMAP_SCAN already answers in runs, so a scan fills one of these with no
# per-page work; DirtySet.add_runs() then ORs it into any number of bitmaps.

cdef struct RunBuf:
    uint64_t *data      # pairs: first page, one past last page
    uint64_t n          # runs held
    uint64_t cap        # runs allocated


cdef inline int runbuf_append(RunBuf *rb, uint64_t first, uint64_t stop) noexcept nogil:
    """Append [first, stop); merges with the previous run when they touch.
    Runs must arrive in ascending order. Returns 0, ENOMEM, or EIO for a run
    that starts before the previous one (the caller must treat that as lost)."""
    cdef uint64_t *grown
    cdef uint64_t newcap
    if first >= stop:
        return 0
    if rb.n and first < rb.data[2 * rb.n - 2]:
        return EIO          # out of order: never drop a run silently
    if rb.n and rb.data[2 * rb.n - 1] >= first:
        if stop > rb.data[2 * rb.n - 1]:
            rb.data[2 * rb.n - 1] = stop
        return 0
    if rb.n == rb.cap:
        newcap = rb.cap * 2 if rb.cap else 64
        grown = <uint64_t *>realloc(rb.data, newcap * 2 * sizeof(uint64_t))
        if grown == NULL:
            return ENOMEM
        rb.data = grown
        rb.cap = newcap
    rb.data[2 * rb.n] = first
    rb.data[2 * rb.n + 1] = stop
    rb.n += 1
    return 0


@cython.final
cdef class RunList:
    """Dirty pages as ascending runs ``[first, stop)`` of page indexes.

    What one scan of a region returned. ``lost_reason`` is set when tracking
    of the region was lost: the runs then cover every page of the region and
    the reader must treat the whole region as written (full resync).
    """
    cdef RunBuf buf
    cdef readonly uint64_t npages
    cdef readonly object lost_reason

    def __cinit__(self, uint64_t npages, *, lost_reason=None):
        self.npages = npages
        self.lost_reason = None
        if lost_reason is not None:
            self._mark_lost(lost_reason)

    def __dealloc__(self):
        free(self.buf.data)
        self.buf.data = NULL

    cdef int _mark_lost(self, reason) except -1:
        self.lost_reason = str(reason)
        self.buf.n = 0
        if self.npages and runbuf_append(&self.buf, 0, self.npages):
            raise MemoryError()
        return 0

    def append(self, uint64_t first, uint64_t stop):
        """Add run ``[first, stop)``; runs must be added in ascending order."""
        if first > stop or stop > self.npages:
            raise ValueError(f"run [{first}, {stop}) is outside [0, {self.npages})")
        if self.buf.n and first < self.buf.data[2 * self.buf.n - 2]:
            raise ValueError("runs must be appended in ascending order")
        if runbuf_append(&self.buf, first, stop):
            raise MemoryError()

    @property
    def lost(self):
        return self.lost_reason is not None

    @property
    def count(self):
        """Number of pages in all runs."""
        cdef uint64_t total = 0
        cdef uint64_t i
        for i in range(self.buf.n):
            total += self.buf.data[2 * i + 1] - self.buf.data[2 * i]
        return total

    def __len__(self):
        return <Py_ssize_t>self.buf.n

    def __iter__(self):
        cdef uint64_t i
        for i in range(self.buf.n):
            yield (self.buf.data[2 * i], self.buf.data[2 * i + 1])

    def __repr__(self):
        lost = f", lost={self.lost_reason!r}" if self.lost_reason is not None else ""
        return f"<RunList {self.buf.n} runs, {self.count} of {self.npages} pages{lost}>"

    def to_dirtyset(self):
        cdef DirtySet d = DirtySet(self.npages)
        d.add_runs(self)
        return d
