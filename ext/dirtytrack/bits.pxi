# bits.pxi - word-level bitmap primitives shared by DirtySet and RunList.
# Invariant kept by every caller: bits at or beyond `nbits` in the last word
# are zero, so popcount and equality need no masking.

cdef extern from *:
    int __builtin_popcountll(unsigned long long) nogil
    int __builtin_ctzll(unsigned long long) nogil

cdef inline uint64_t words_for(uint64_t nbits) noexcept nogil:
    return (nbits + 63) >> 6


cdef inline void bits_set_range(uint64_t *w, uint64_t first, uint64_t stop) noexcept nogil:
    """Set bits [first, stop)."""
    if first >= stop:
        return
    cdef uint64_t fw = first >> 6
    cdef uint64_t lw = (stop - 1) >> 6
    cdef uint64_t fmask = (~<uint64_t>0) << (first & 63)
    cdef uint64_t lmask = (~<uint64_t>0) >> (63 - ((stop - 1) & 63))
    if fw == lw:
        w[fw] |= fmask & lmask
        return
    w[fw] |= fmask
    if lw > fw + 1:
        memset(&w[fw + 1], 0xff, (lw - fw - 1) * sizeof(uint64_t))
    w[lw] |= lmask


cdef inline uint64_t bits_find(const uint64_t *w, uint64_t nbits, uint64_t pos,
                               bint value) noexcept nogil:
    """First index >= pos whose bit equals `value`, or nbits if none."""
    if pos >= nbits:
        return nbits
    cdef uint64_t nw = words_for(nbits)
    cdef uint64_t i = pos >> 6
    cdef uint64_t word = w[i] if value else ~w[i]
    word &= (~<uint64_t>0) << (pos & 63)
    while word == 0:
        i += 1
        if i >= nw:
            return nbits
        word = w[i] if value else ~w[i]
    cdef uint64_t found = (i << 6) + <uint64_t>__builtin_ctzll(word)
    return found if found < nbits else nbits


cdef inline uint64_t bits_count(const uint64_t *w, uint64_t nwords) noexcept nogil:
    cdef uint64_t total = 0
    cdef uint64_t i
    for i in range(nwords):
        total += <uint64_t>__builtin_popcountll(w[i])
    return total
