# tracker.pxi - Tracker: one userfaultfd and the regions registered on it.
#
# A region is write-protected when added. Each scan asks PAGEMAP_SCAN for the
# pages written since the previous one and re-protects them in the same walk
# (get-and-reset under the page-table lock, so no write can slip between the
# two). Whatever stops a scan from proving that - an EPERM from a VMA that lost
# its registration, a hole where the range was unmapped, any other error after
# the kernel may already have reset some pages - turns the region "lost": the
# caller gets every page of it plus the reason, never a smaller set.

import threading

cdef enum:
    # page_region entries per PAGEMAP_SCAN call (24 KiB). The kernel merges
    # adjacent written pages, so one call usually covers a whole region.
    SCAN_VEC_LEN = 1024
    # UFFDIO_WRITEPROTECT answers EAGAIN while the address space is changing.
    WRITEPROTECT_RETRIES = 100


cdef struct ScanSink:
    # Where a scan puts its runs: a RunBuf (scan()), or straight into the
    # words of a DirtySet (collect(): no run list in between).
    RunBuf *runs
    uint64_t *words
    uint64_t last_first     # first page of the previous run, for the order check


cdef inline int sink_add(ScanSink *sink, uint64_t first, uint64_t stop) noexcept nogil:
    """0, ENOMEM, or EIO for a run starting before the previous one: the
    kernel's walk is ascending, anything else means the scan is not understood
    (the caller treats the region as lost), even where a bitmap would not mind."""
    if first < sink.last_first:
        return EIO
    sink.last_first = first
    if sink.runs != NULL:
        return runbuf_append(sink.runs, first, stop)
    bits_set_range(sink.words, first, stop)
    return 0


cdef int scan_range(int pagemap_fd, page_region *vec, uint64_t vec_len,
                    uint64_t start, uint64_t end, unsigned page_shift,
                    ScanSink *out) noexcept nogil:
    """Collect and re-protect the written pages of [start, end) into `out`,
    as page indexes relative to `start`. Returns 0 or an errno."""
    cdef pm_scan_arg arg
    cdef long n, i
    cdef uint64_t pos = start
    cdef uint64_t first, stop
    cdef uint64_t page_mask = ((<uint64_t>1) << page_shift) - 1
    cdef int rc
    while pos < end:
        memset(&arg, 0, sizeof(arg))
        arg.size = sizeof(pm_scan_arg)
        # CHECK_WPASYNC: a VMA that lost its registration is an EPERM, not a
        # silent skip. The masks are the kernel's fast-path form.
        arg.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
        arg.start = pos
        arg.end = end
        arg.vec = <uint64_t><uintptr_t>vec
        arg.vec_len = vec_len
        arg.category_mask = PAGE_IS_WRITTEN
        arg.return_mask = PAGE_IS_WRITTEN
        n = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg)
        if n < 0:
            return errno
        for i in range(n):
            first = vec[i].start if vec[i].start > pos else pos
            stop = vec[i].end if vec[i].end < end else end
            if first >= stop:
                continue
            rc = sink_add(out, (first - start) >> page_shift,
                          (stop - start + page_mask) >> page_shift)
            if rc:
                return rc
        # The walk may stop short of `end` (full vector, or a huge page it
        # would not split): resume there. No progress would loop forever.
        if arg.walk_end <= pos or arg.walk_end > end:
            return EIO
        pos = arg.walk_end
        # Kernel quirk (6.7-6.18 do_pagemap_scan): once its 512-entry bounce
        # buffer fills and is flushed, a call that then finishes the range
        # returns the stale walk_end of that last flush. The walk is ascending, so
        # everything below the last region returned was walked: resume past
        # it, or runs would arrive out of order.
        if n > 0 and vec[n - 1].end > pos:
            pos = vec[n - 1].end if vec[n - 1].end < end else end
    return 0


cdef int register_wp(int uffd, uint64_t start, uint64_t length) noexcept nogil:
    """UFFDIO_REGISTER in WP mode. 0 or errno."""
    cdef uffdio_register reg
    memset(&reg, 0, sizeof(reg))
    reg.range.start = start
    reg.range.len = length
    reg.mode = UFFDIO_REGISTER_MODE_WP
    if ioctl(uffd, UFFDIO_REGISTER, &reg) < 0:
        return errno
    return 0


cdef int unregister(int uffd, uint64_t start, uint64_t length) noexcept nogil:
    cdef uffdio_range rng
    rng.start = start
    rng.len = length
    if ioctl(uffd, UFFDIO_UNREGISTER, &rng) < 0:
        return errno
    return 0


cdef int write_protect(int uffd, uint64_t start, uint64_t length) noexcept nogil:
    """Write-protect every page of the range, populated or not. 0 or errno."""
    cdef uffdio_writeprotect wp
    cdef int attempt
    for attempt in range(WRITEPROTECT_RETRIES):
        memset(&wp, 0, sizeof(wp))
        wp.range.start = start
        wp.range.len = length
        wp.mode = UFFDIO_WRITEPROTECT_MODE_WP
        if ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) == 0:
            return 0
        if errno != EAGAIN:
            return errno
    return EAGAIN


cdef int find_gap(int maps_fd, uint64_t start, uint64_t end, uint64_t *gap) noexcept nogil:
    """Is [start, end) wholly covered by VMAs? PROCMAP_QUERY (6.11+) on
    /proc/PID/maps. 0: covered; 1: not, first hole at *gap; else -errno
    (-ENOTTY: this kernel has no PROCMAP_QUERY)."""
    cdef procmap_query q
    cdef uint64_t pos = start
    while pos < end:
        memset(&q, 0, sizeof(q))
        q.size = sizeof(procmap_query)
        q.query_flags = PROCMAP_QUERY_COVERING_OR_NEXT_VMA
        q.query_addr = pos
        if ioctl(maps_fd, PROCMAP_QUERY, &q) < 0:
            if errno == ENOENT:      # no VMA at or after pos
                gap[0] = pos
                return 1
            return -errno
        if q.vma_start > pos:
            gap[0] = pos
            return 1
        pos = q.vma_end
    return 0


def _scan_error_reason(int err, uint64_t start, uint64_t end):
    rng = f"[{start:#x}, {end:#x})"
    if err == EPERM:
        return (f"tracking of {rng} was lost: part of it is no longer registered for "
                "write-protect (the mapping was moved by mremap, or unmapped and mapped again)")
    if err == EIO:
        return (f"the scan of {rng} could not be trusted (the kernel's walk_end did not "
                "advance, or its runs came out of order)")
    if err == ENOMEM:
        return f"out of memory while scanning {rng}"
    return f"the scan of {rng} failed: {os.strerror(err)}"


@cython.final
cdef class Region:
    """A tracked address range ``[start, end)``, page aligned."""
    cdef readonly uint64_t start
    cdef readonly uint64_t end
    cdef readonly uint64_t npages
    cdef readonly object lost_reason
    cdef bint removed

    def __cinit__(self, uint64_t start, uint64_t end, uint64_t npages):
        self.start = start
        self.end = end
        self.npages = npages
        self.lost_reason = None

    @property
    def state(self):
        if self.removed:
            return "removed"
        return "lost" if self.lost_reason is not None else "tracking"

    @property
    def length(self):
        return self.end - self.start

    def __repr__(self):
        return f"<Region [{self.start:#x}, {self.end:#x}) {self.npages} pages {self.state}>"


@cython.final
cdef class Tracker:
    """Write tracking of address ranges of one process, through one userfaultfd.

    ``Tracker()`` tracks the calling process with a userfaultfd it creates.
    ``Tracker(pid, uffd=fd)`` adopts a userfaultfd that belongs to process
    `pid` (taken with pidfd_getfd or received over SCM_RIGHTS) and owns it from
    then on; pass ``handshake=False`` if its owner already did UFFDIO_API.
    Methods are thread-safe; scans run without the GIL.
    """
    cdef int uffd
    cdef int pagemap_fd
    cdef int maps_fd
    cdef readonly int pid
    cdef readonly uint64_t features
    cdef readonly str uffd_source
    cdef readonly Py_ssize_t page_size
    cdef unsigned page_shift
    cdef page_region *vec
    cdef list _regions
    cdef object _lock
    cdef int has_procmap_query    # -1 not yet known, 0 no, 1 yes

    def __cinit__(self, *args, **kwargs):
        self.uffd = -1
        self.pagemap_fd = -1
        self.maps_fd = -1
        self.vec = NULL
        self._regions = []
        self._lock = threading.Lock()
        self.has_procmap_query = -1

    def __init__(self, pid=None, uffd=None, *, bint handshake=True):
        cdef int how = 0
        cdef int fd
        cdef uint64_t offered = 0
        cdef uint64_t granted = 0
        cdef int rc
        self.page_size = sysconf(_SC_PAGESIZE)
        self.page_shift = <unsigned>__builtin_ctzll(<unsigned long long>self.page_size)
        own = pid is None or pid == os.getpid()
        self.pid = os.getpid() if pid is None else int(pid)
        if uffd is None:
            if not own:
                raise ValueError("a userfaultfd for another process must be passed as uffd= "
                                 "(use dirtytrack.attach to get one)")
            with nogil:
                fd = uffd_open(True, &how)
            if fd < 0:
                raise error_for("userfaultfd", -fd)
            self.uffd = fd
            self.uffd_source = ("syscall", "user-mode-only", "/dev/userfaultfd")[how]
        else:
            self.uffd = int(uffd)
            self.uffd_source = "adopted"
        if handshake:
            with nogil:
                rc = uffd_query_features(&offered)
            if rc < 0:
                self._close_fds()
                raise error_for("userfaultfd", -rc)
            if offered & WANTED_FEATURES != WANTED_FEATURES:
                self._close_fds()
                missing = [name for bit, name in ((UFFD_FEATURE_WP_ASYNC, "WP_ASYNC"),
                                                  (UFFD_FEATURE_WP_UNPOPULATED, "WP_UNPOPULATED"))
                           if not offered & bit]
                raise KernelUnsupported(
                    "this kernel's userfaultfd lacks " + " and ".join(missing) +
                    f" (offered features {offered:#x}): async write-protect needs Linux 6.7+",
                    EINVAL)
            with nogil:
                rc = uffd_handshake(self.uffd, WANTED_FEATURES | (offered & OPTIONAL_FEATURES),
                                    &granted)
            if rc < 0:
                self._close_fds()
                if -rc == EINVAL and uffd is not None:
                    raise DirtytrackError(
                        "the adopted userfaultfd already did its handshake (UFFDIO_API): "
                        "pass handshake=False, and make sure its owner asked for "
                        "UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED", -rc)
                raise error_for("api", -rc)
            self.features = granted
        proc = "/proc/self" if own else f"/proc/{self.pid}"
        try:
            self.pagemap_fd = os.open(f"{proc}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            self.maps_fd = os.open(f"{proc}/maps", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            self._close_fds()
            raise error_for("pagemap", exc.errno or EIO) from exc
        self.vec = <page_region *>calloc(SCAN_VEC_LEN, sizeof(page_region))
        if self.vec == NULL:
            self._close_fds()
            raise MemoryError()

    cdef void _close_fds(self) noexcept:
        if self.uffd >= 0:
            close(self.uffd)
            self.uffd = -1
        if self.pagemap_fd >= 0:
            close(self.pagemap_fd)
            self.pagemap_fd = -1
        if self.maps_fd >= 0:
            close(self.maps_fd)
            self.maps_fd = -1
        free(self.vec)
        self.vec = NULL

    def __dealloc__(self):
        self._close_fds()

    cdef int _check_open(self) except -1:
        if self.uffd < 0:
            raise TrackerClosed("the tracker is closed")
        return 0

    # -- ranges -----------------------------------------------------------
    @property
    def closed(self):
        return self.uffd < 0

    @property
    def regions(self):
        return tuple(self._regions)

    def add_range(self, start, length):
        """Register and write-protect ``[start, start + length)``; returns its Region.

        Writes from now on are reported by collect(). Both values must be
        multiples of the page size (of the huge page size for hugetlb).
        """
        cdef uint64_t s, n, e
        cdef int err
        cdef Region r
        if not isinstance(start, int) or not isinstance(length, int):
            raise InvalidRange("start and length must be integers")
        if start < 0 or length <= 0 or start + length > 1 << 64:
            raise InvalidRange(f"cannot track [{start:#x}, +{length:#x}): the range is empty, "
                               "negative or beyond the address space")
        if start % self.page_size or length % self.page_size:
            raise InvalidRange(f"cannot track [{start:#x}, +{length:#x}): start and length must "
                               f"be multiples of the page size ({self.page_size})")
        s = start
        n = length
        e = s + n
        with self._lock:
            self._check_open()
            for other in self._regions:
                if s < (<Region>other).end and (<Region>other).start < e:
                    raise InvalidRange(f"[{s:#x}, {e:#x}) overlaps {other!r} of this tracker")
            r = Region(s, e, n >> self.page_shift)
            # UFFDIO_REGISTER silently skips holes between VMAs; refuse them
            # here so that a region is always wholly tracked from its start.
            gap = self._gap(r)
            if gap is not None:
                raise InvalidRange(f"cannot track [{s:#x}, {e:#x}): nothing is mapped at "
                                   f"{gap:#x} (see /proc/{self.pid}/maps)", EINVAL)
            with nogil:
                err = register_wp(self.uffd, s, n)
            if err:
                raise error_for("register", err, s, e)
            with nogil:
                err = write_protect(self.uffd, s, n)
                if err:
                    unregister(self.uffd, s, n)
            if err:
                raise error_for("writeprotect", err, s, e)
            self._regions.append(r)
            return r

    def remove_range(self, Region region not None):
        """Stop tracking `region`. Pages written since the last collect are dropped."""
        with self._lock:
            self._check_open()
            if region not in self._regions:
                raise InvalidRange(f"{region!r} is not tracked by this tracker")
            self._regions.remove(region)
            region.removed = True
            with nogil:
                unregister(self.uffd, region.start, region.end - region.start)

    # -- scanning ---------------------------------------------------------
    cdef object _gap(self, Region r):
        """Address of the first hole in r, None if wholly mapped."""
        cdef uint64_t gap = 0
        cdef int rc = -ENOTTY
        if self.has_procmap_query != 0:
            with nogil:
                rc = find_gap(self.maps_fd, r.start, r.end, &gap)
            if rc == -ENOTTY or rc == -EINVAL:
                self.has_procmap_query = 0
            elif rc < 0:
                return r.start          # cannot tell: assume the worst
            else:
                self.has_procmap_query = 1
                return gap if rc == 1 else None
        # Before 6.11: the maps text, through the fd opened while the process was ours.
        return first_gap(read_maps(self.maps_fd), r.start, r.end)

    cdef void _rearm(self, Region r) noexcept:
        """Try to register and protect a lost region again. On success it is
        tracked from this instant; the caller reports it whole either way."""
        cdef int err
        cdef uint64_t n = r.end - r.start
        with nogil:
            unregister(self.uffd, r.start, n)
            err = register_wp(self.uffd, r.start, n)
            if not err:
                err = write_protect(self.uffd, r.start, n)
                if err:
                    unregister(self.uffd, r.start, n)
        if not err:
            r.lost_reason = None

    cdef object _scan(self, Region r, ScanSink *sink):
        """Scan r into sink. Returns None, or why r must be reported whole
        (lost): the caller then marks its set lost."""
        cdef int err = 0
        if r.lost_reason is None:
            with nogil:
                err = scan_range(self.pagemap_fd, self.vec, SCAN_VEC_LEN, r.start, r.end,
                                 self.page_shift, sink)
            if err:
                r.lost_reason = _scan_error_reason(err, r.start, r.end)
            else:
                gap = self._gap(r)
                if gap is not None:
                    r.lost_reason = (f"tracking of [{r.start:#x}, {r.end:#x}) was lost: "
                                     f"nothing is mapped at {gap:#x} any more (munmap or mremap)")
        reason = r.lost_reason
        if reason is not None:
            self._rearm(r)
        return reason

    cdef int _check_region(self, Region region) except -1:
        self._check_open()
        if region.removed or region not in self._regions:
            raise InvalidRange(f"{region!r} is not tracked by this tracker")
        return 0

    def scan(self, Region region not None):
        """Pages of `region` written since its previous scan, as a RunList
        (page indexes relative to region.start). The pages are protected
        again in the same kernel walk."""
        cdef RunList runs = RunList(region.npages)
        cdef ScanSink sink
        sink.runs = &runs.buf
        sink.words = NULL
        sink.last_first = 0
        with self._lock:
            self._check_region(region)
            reason = self._scan(region, &sink)
        if reason is not None:
            runs._mark_lost(reason)
        return runs

    def collect(self, Region region not None):
        """Pages of `region` written since its previous collect, as a DirtySet
        (filled from the kernel's answer directly, no RunList in between)."""
        cdef DirtySet d = DirtySet(region.npages)
        cdef ScanSink sink
        sink.runs = NULL
        sink.words = d.words
        sink.last_first = 0
        with self._lock:
            self._check_region(region)
            reason = self._scan(region, &sink)
        if reason is not None:
            d.mark_lost(reason)
        return d

    def collect_all(self):
        """A list of (region, DirtySet) for every tracked region."""
        with self._lock:
            self._check_open()
            regions = list(self._regions)
        return [(r, self.collect(r)) for r in regions]

    # -- life -------------------------------------------------------------
    def close(self):
        """Unregister every region and close the userfaultfd. Idempotent."""
        with self._lock:
            if self.uffd < 0:
                return
            for region in self._regions:
                (<Region>region).removed = True
                with nogil:
                    unregister(self.uffd, (<Region>region).start,
                               (<Region>region).end - (<Region>region).start)
            self._regions = []
            self._close_fds()

    def __enter__(self):
        self._check_open()
        return self

    def __exit__(self, *exc):
        self.close()

    def pagemap_fileno(self):
        """The /proc/PID/pagemap fd scans use; still owned by the tracker."""
        self._check_open()
        return self.pagemap_fd

    def fileno(self):
        """The userfaultfd, for callers that poll it; still owned by the tracker."""
        self._check_open()
        return self.uffd

    def __repr__(self):
        state = "closed" if self.uffd < 0 else f"{len(self._regions)} regions"
        return f"<Tracker pid={self.pid} {state}>"


def pagemap_scan(int pagemap_fd, uint64_t start, uint64_t end, *, uint64_t flags=0,
                 uint64_t category_mask=0, uint64_t return_mask=0,
                 uint64_t category_inverted=0, uint64_t category_anyof_mask=0,
                 uint64_t vec_len=1024, uint64_t max_pages=0):
    """One raw PAGEMAP_SCAN call, for tests and benchmarks of the kernel itself.

    Returns (regions, walk_end) with regions a list of (start, end, categories).
    Raises OSError with the kernel's errno. Trackers never need this.
    """
    cdef pm_scan_arg arg
    cdef page_region *vec = NULL
    cdef long n
    cdef int err = 0
    if vec_len:
        vec = <page_region *>calloc(vec_len, sizeof(page_region))
        if vec == NULL:
            raise MemoryError()
    try:
        memset(&arg, 0, sizeof(arg))
        arg.size = sizeof(pm_scan_arg)
        arg.flags = flags
        arg.start = start
        arg.end = end
        arg.vec = <uint64_t><uintptr_t>vec
        arg.vec_len = vec_len
        arg.max_pages = max_pages
        arg.category_inverted = category_inverted
        arg.category_mask = category_mask
        arg.category_anyof_mask = category_anyof_mask
        arg.return_mask = return_mask
        with nogil:
            n = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg)
            if n < 0:
                err = errno
        if n < 0:
            raise OSError(err, f"PAGEMAP_SCAN: {os.strerror(err)}")
        return [(vec[i].start, vec[i].end, vec[i].categories) for i in range(n)], arg.walk_end
    finally:
        free(vec)
