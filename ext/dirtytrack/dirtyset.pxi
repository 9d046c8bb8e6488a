# dirtyset.pxi - DirtySet: a bitmap of written pages with run-level access and
# a compact wire encoding.  Page-touching loops run without the GIL.

cdef enum:
    ENCODING_VERSION = 1
    KIND_RUNS = 0
    KIND_BITMAP = 1
    FLAG_LOST = 1

# 2**40 pages = 4 PiB of 4 KiB pages: far beyond any address space, small
# enough that a hostile encoding cannot ask for an absurd allocation.
cdef uint64_t MAX_PAGES = (<uint64_t>1) << 40


cdef inline uint64_t varint_size(uint64_t v) noexcept nogil:
    cdef uint64_t n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef inline uint8_t *varint_put(uint8_t *p, uint64_t v) noexcept nogil:
    while v >= 0x80:
        p[0] = <uint8_t>((v & 0x7f) | 0x80)
        p += 1
        v >>= 7
    p[0] = <uint8_t>v
    return p + 1


cdef inline int varint_get(const uint8_t **p, const uint8_t *end, uint64_t *out) noexcept nogil:
    """Decode one LEB128 value; 0 on success, -1 on truncation or overflow."""
    cdef uint64_t v = 0
    cdef unsigned shift = 0
    cdef uint8_t b
    while True:
        if p[0] >= end or shift > 63:
            return -1
        b = p[0][0]
        p[0] += 1
        if shift == 63 and (b & 0x7e):
            return -1
        v |= (<uint64_t>(b & 0x7f)) << shift
        if not (b & 0x80):
            out[0] = v
            return 0
        shift += 7


cdef enum:
    WIRE_SLACK = 128


cdef struct WireBody:
    uint64_t count      # pages in the set
    uint64_t nruns      # maximal runs (valid only when kind == KIND_RUNS)
    uint64_t size       # bytes of the body written to the output buffer
    int kind            # KIND_RUNS: (gap, length) pairs; KIND_BITMAP: the raw bitmap


cdef void wire_body(const uint64_t *w, uint64_t nwords, uint64_t npages,
                    uint8_t *out, WireBody *res) noexcept nogil:
    """One pass over the words: the page count, and the run body written
    straight to `out` until it stops being smaller than the bitmap, in which
    case the bitmap is copied there instead. `out` holds at least
    ceil(npages / 8) + WIRE_SLACK bytes: the check is once a word, and one
    word adds at most 2 pairs of 10-byte varints and 31 pairs of 1 byte. The choice is the one encode() documents:
    runs when count varint + pairs <= bitmap bytes."""
    cdef uint64_t bitmap_body = (npages + 7) >> 3
    cdef uint8_t *p = out
    cdef uint8_t *limit = out + bitmap_body     # pairs past this: the bitmap wins
    cdef uint64_t i, word, rest, base, start = 0, prev = 0, count = 0, nruns = 0
    cdef unsigned b, e
    cdef bint in_run = False, runs = True
    for i in range(nwords):
        word = w[i]
        count += <uint64_t>__builtin_popcountll(word)
        if not runs:
            continue
        base = i << 6
        if in_run:
            if word == ~(<uint64_t>0):
                continue
            e = <unsigned>__builtin_ctzll(~word)
            if e:
                word &= (~(<uint64_t>0)) << e
            p = varint_put(varint_put(p, start - prev), base + e - start)
            prev = base + e
            nruns += 1
            in_run = False
        while word:
            b = <unsigned>__builtin_ctzll(word)
            rest = ~word & ((~(<uint64_t>0)) << b)     # clear bits from b on
            if rest == 0:
                start = base + b
                in_run = True                          # runs on into the next word
                break
            e = <unsigned>__builtin_ctzll(rest)
            p = varint_put(varint_put(p, base + b - prev), e - b)
            prev = base + e
            nruns += 1
            word &= (~(<uint64_t>0)) << e
        if p > limit:
            runs = False
    if runs and in_run:
        # Bits past npages are zero, so a run open at the end stops at npages.
        p = varint_put(varint_put(p, start - prev), npages - start)
        nruns += 1
    res.count = count
    if runs and <uint64_t>(p - out) + varint_size(nruns) <= bitmap_body:
        res.kind = KIND_RUNS
        res.nruns = nruns
        res.size = <uint64_t>(p - out)
    else:
        # Words are little-endian on every supported target, so their
        # bytes are already in wire order.
        memcpy(out, w, bitmap_body)
        res.kind = KIND_BITMAP
        res.nruns = 0
        res.size = bitmap_body


cdef inline int runs_validate(const uint8_t **p, const uint8_t *end, uint64_t nruns,
                              uint64_t npages) noexcept nogil:
    """Check a run body: 0 valid, 1 truncated, 2 out of range or order."""
    cdef uint64_t i, gap, length, pos = 0
    for i in range(nruns):
        if varint_get(p, end, &gap) or varint_get(p, end, &length):
            return 1
        if length == 0 or gap > npages - pos or length > npages - pos - gap or (i and gap == 0):
            return 2
        pos += gap + length
    return 0


def _join_reasons(a, b):
    """Both reasons, each said once (merging the same loss again adds nothing)."""
    if a is None:
        return b
    if b is None:
        return a
    parts = a.split("; ")
    parts += [part for part in b.split("; ") if part not in parts]
    return "; ".join(parts)


@cython.final
cdef class DirtySet:
    """The set of pages written in some interval, one bit per page.

    Page numbers are relative to the start of what was tracked. When
    ``lost_reason`` is set the tracker could not prove the set complete: every
    page is in the set and the reader must resend everything (full resync).
    """
    cdef uint64_t *words
    cdef readonly uint64_t npages
    cdef uint64_t nwords
    cdef readonly object lost_reason

    def __cinit__(self, uint64_t npages, *, lost_reason=None):
        if npages > MAX_PAGES:
            raise ValueError(f"npages {npages} exceeds the supported maximum {MAX_PAGES}")
        self.npages = npages
        self.nwords = words_for(npages)
        self.words = <uint64_t *>calloc(self.nwords if self.nwords else 1, sizeof(uint64_t))
        if self.words == NULL:
            raise MemoryError()
        self.lost_reason = None
        if lost_reason is not None:
            self.mark_lost(lost_reason)

    def __dealloc__(self):
        free(self.words)
        self.words = NULL

    # -- building ---------------------------------------------------------
    cdef inline int _check_page(self, uint64_t page) except -1:
        if page >= self.npages:
            raise IndexError(f"page {page} is outside [0, {self.npages})")
        return 0

    def add(self, uint64_t page):
        self._check_page(page)
        self.words[page >> 6] |= (<uint64_t>1) << (page & 63)

    def add_range(self, uint64_t first, uint64_t stop):
        """Add pages ``[first, stop)``."""
        if first > stop or stop > self.npages:
            raise IndexError(f"range [{first}, {stop}) is outside [0, {self.npages})")
        with nogil:
            bits_set_range(self.words, first, stop)

    def add_runs(self, RunList runs not None):
        """OR a scan's runs into this set (and its lost state, if any)."""
        if runs.npages != self.npages:
            raise ValueError(f"run list covers {runs.npages} pages, this set {self.npages}")
        cdef uint64_t i
        cdef const uint64_t *data = runs.buf.data
        with nogil:
            for i in range(runs.buf.n):
                bits_set_range(self.words, data[2 * i], data[2 * i + 1])
        if runs.lost_reason is not None:
            self.lost_reason = _join_reasons(self.lost_reason, runs.lost_reason)

    def mark_lost(self, reason):
        """Tracking could not be proven complete: the set becomes every page."""
        self.lost_reason = _join_reasons(self.lost_reason, str(reason))
        with nogil:
            bits_set_range(self.words, 0, self.npages)

    def clear(self):
        """Empty the set, forgetting any lost state."""
        memset(self.words, 0, self.nwords * sizeof(uint64_t))
        self.lost_reason = None

    def copy(self):
        cdef DirtySet other = DirtySet(self.npages)
        memcpy(other.words, self.words, self.nwords * sizeof(uint64_t))
        other.lost_reason = self.lost_reason
        return other

    def __ior__(self, other):
        if not isinstance(other, DirtySet):
            return NotImplemented
        cdef DirtySet o = <DirtySet>other
        if o.npages != self.npages:
            raise ValueError(f"cannot merge a set of {o.npages} pages into one of {self.npages}")
        cdef uint64_t i
        with nogil:
            for i in range(self.nwords):
                self.words[i] |= o.words[i]
        self.lost_reason = _join_reasons(self.lost_reason, o.lost_reason)
        return self

    def __or__(self, other):
        if not isinstance(self, DirtySet) or not isinstance(other, DirtySet):
            return NotImplemented
        result = self.copy()
        result |= other
        return result

    # -- reading ----------------------------------------------------------
    @property
    def lost(self):
        return self.lost_reason is not None

    @property
    def count(self):
        """Number of pages in the set."""
        cdef uint64_t total
        with nogil:
            total = bits_count(self.words, self.nwords)
        return total

    def __len__(self):
        return <Py_ssize_t>self.count

    def __bool__(self):
        return bits_find(self.words, self.npages, 0, 1) < self.npages

    def __contains__(self, page):
        if not isinstance(page, int) or page < 0 or page >= self.npages:
            return False
        cdef uint64_t p = page
        return (self.words[p >> 6] >> (p & 63)) & 1 == 1

    def __iter__(self):
        for first, stop in self.runs():
            yield from range(first, stop)

    def pages(self):
        """Every page in the set, ascending."""
        return list(self)

    def ranges(self):
        """The set as ascending ``(first, stop)`` page runs, ``stop`` exclusive."""
        return list(self.runs())

    def runs(self):
        """A RunList of the set, computed without the GIL."""
        cdef RunList out = RunList(self.npages)
        cdef uint64_t first, stop
        cdef int err = 0
        with nogil:
            first = bits_find(self.words, self.npages, 0, 1)
            while first < self.npages and not err:
                stop = bits_find(self.words, self.npages, first, 0)
                err = runbuf_append(&out.buf, first, stop)
                first = bits_find(self.words, self.npages, stop, 1)
        if err:
            raise MemoryError()
        out.lost_reason = self.lost_reason
        return out

    def __eq__(self, other):
        if not isinstance(other, DirtySet):
            return NotImplemented
        cdef DirtySet o = <DirtySet>other
        return (self.npages == o.npages and self.lost_reason == o.lost_reason
                and memcmp(self.words, o.words, self.nwords * sizeof(uint64_t)) == 0)

    __hash__ = None

    def __repr__(self):
        lost = f", lost={self.lost_reason!r}" if self.lost_reason is not None else ""
        return f"<DirtySet {self.count} of {self.npages} pages{lost}>"

    # -- wire encoding ----------------------------------------------------
    cdef bytearray _wire(self, WireBody *res):
        """The body of wire_body() in a buffer of its exact size."""
        out = bytearray(((self.npages + 7) >> 3) + WIRE_SLACK)
        cdef uint8_t *p = out
        with nogil:
            wire_body(self.words, self.nwords, self.npages, p, res)
        del out[res.size:]
        return out

    def wire(self):
        """(form, body, count): form "runs" with (gap, length) LEB128 pairs, or
        "bitmap" (page i at bit i % 8 of byte i // 8), whichever encode() would
        pick; body is exactly the dirtytrack.v1 MappingDirty field. One pass."""
        cdef WireBody res
        body = self._wire(&res)
        return ("runs" if res.kind == KIND_RUNS else "bitmap"), bytes(body), res.count

    def encode(self):
        """Compact bytes: page runs or a raw bitmap, whichever is smaller.

        Layout: b"DT", version u8, kind u8 (0 runs, 1 bitmap), flags u8
        (1 = lost), npages varint, [reason length varint + UTF-8 if lost],
        then for runs: count varint and (gap, length) varint pairs; for a
        bitmap: ceil(npages / 8) bytes, page i at bit i % 8 of byte i // 8.
        """
        reason = (self.lost_reason.encode("utf-8", "replace")
                  if self.lost_reason is not None else b"")
        cdef WireBody res
        body = self._wire(&res)
        cdef uint8_t head[40]
        cdef uint8_t *p = head
        p[0] = b'D'; p[1] = b'T'; p[2] = ENCODING_VERSION; p[3] = res.kind
        p[4] = FLAG_LOST if self.lost_reason is not None else 0
        p = varint_put(p + 5, self.npages)
        if self.lost_reason is not None:
            p = varint_put(p, len(reason))
        out = bytearray((<char *>head)[:p - head])
        out += reason
        if res.kind == KIND_RUNS:
            p = varint_put(head, res.nruns)
            out += (<char *>head)[:p - head]
        out += body
        return bytes(out)

    @staticmethod
    def decode(data):
        """Inverse of encode(). Malformed input raises ValueError."""
        cdef const uint8_t[::1] view = memoryview(data).cast("B")
        cdef Py_ssize_t size = view.shape[0]
        if size < 6:
            raise ValueError("dirty set encoding is truncated")
        cdef const uint8_t *p = &view[0]
        cdef const uint8_t *end = p + size
        if p[0] != b'D' or p[1] != b'T':
            raise ValueError("not a dirty set encoding (bad magic)")
        if p[2] != ENCODING_VERSION:
            raise ValueError(f"dirty set encoding version {p[2]} is not supported (expected {ENCODING_VERSION})")
        cdef int kind = p[3]
        cdef int flags = p[4]
        if kind not in (KIND_RUNS, KIND_BITMAP) or flags & ~FLAG_LOST:
            raise ValueError("dirty set encoding has an unknown kind or flag")
        p += 5
        cdef uint64_t npages, nreason, nruns, i, pos = 0, body
        cdef uint64_t gap = 0, length = 0
        if varint_get(&p, end, &npages) or npages > MAX_PAGES:
            raise ValueError("dirty set encoding has a bad page count")
        reason = None
        if flags & FLAG_LOST:
            if varint_get(&p, end, &nreason) or nreason > <uint64_t>(end - p):
                raise ValueError("dirty set encoding has a truncated lost reason")
            reason = (<const char *>p)[:nreason].decode("utf-8", "replace")
            p += nreason
        # Validate the whole body before allocating the bitmap it claims, so
        # a few hostile bytes cannot ask for gigabytes.
        cdef const uint8_t *body_start
        cdef int bad = 0
        cdef DirtySet d
        if kind == KIND_RUNS:
            if varint_get(&p, end, &nruns) or nruns > <uint64_t>(end - p):
                raise ValueError("dirty set encoding has a bad run count")
            body_start = p
            with nogil:
                bad = runs_validate(&p, end, nruns, npages)
            if bad == 1:
                raise ValueError("dirty set encoding has a truncated run")
            if bad == 2:
                raise ValueError("dirty set encoding has a run outside the page range or out of order")
            if p != end:
                raise ValueError("dirty set encoding has trailing bytes")
            d = DirtySet(npages)
            p = body_start
            with nogil:
                for i in range(nruns):
                    varint_get(&p, end, &gap)
                    varint_get(&p, end, &length)
                    bits_set_range(d.words, pos + gap, pos + gap + length)
                    pos += gap + length
        else:
            body = (npages + 7) // 8
            if <uint64_t>(end - p) < body:
                raise ValueError("dirty set encoding has a truncated bitmap")
            if <uint64_t>(end - p) > body:
                raise ValueError("dirty set encoding has trailing bytes")
            if npages & 7 and ((p + body - 1)[0] >> (npages & 7)):
                raise ValueError("dirty set encoding sets pages beyond its page count")
            d = DirtySet(npages)
            memcpy(d.words, p, body)
        if reason is not None:
            d.mark_lost(reason)
        return d

    @staticmethod
    def from_pages(uint64_t npages, pages):
        cdef DirtySet d = DirtySet(npages)
        for page in pages:
            d.add(page)
        return d
