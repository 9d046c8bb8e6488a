"""Property-based tests of DirtySet / RunList against a plain Python model.

In the style of PyRoaringBitMap's tests: every operation on the compiled page
sets is replayed on a ``set`` of ints (plus the lost reason), and every
observable of the compiled object is compared with what the model says.

Sizes are chosen to exercise the 64-bit word layout of the bitmap: page counts
mostly in 0..300 (0, one partial word, exact multiples of 64, one past), some
up to ~70000; ranges and pages are biased to land on and next to multiples of
64 so runs start, stop and cross word boundaries.

The wire encoding is checked byte for byte against a reference encoder written
from the format description in ``DirtySet.encode``'s docstring, and decoding is
fuzzed (random bytes, single-byte mutations, truncations, bit flips) against a
reference decoder: malformed input must raise ValueError, anything accepted
must be a valid set and equal to what the reference decoder reads.
"""
import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from dirtytrack import DirtySet, RunList

MAX_PAGES = 1 << 40          # DirtySet's documented upper bound on npages
WORD = 64

# DIRTYTRACK_FUZZ_SCALE=N multiplies every example budget (e.g. for a long
# nightly run); the default keeps the whole file well under a minute.
SCALE = max(1, int(os.environ.get("DIRTYTRACK_FUZZ_SCALE", "1")))

SETTINGS = settings(
    max_examples=120 * SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_SETTINGS = settings(SETTINGS, max_examples=400 * SCALE)


# --------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------

BOUNDARY_SIZES = [0, 1, 2, 7, 8, 9, 63, 64, 65, 127, 128, 129, 191, 192, 193,
                  255, 256, 257, 4095, 4096, 4097]

# "Mostly 0..300": the small branch appears twice so it is drawn about half
# the time; the large branch is capped at ~70000 (1094 words).
NPAGES = st.one_of(
    st.integers(0, 300),
    st.integers(0, 300),
    st.sampled_from(BOUNDARY_SIZES),
    st.integers(301, 70000),
)


def position(npages):
    """A position in [0, npages], biased to word (and byte) boundaries."""
    nwords = npages // WORD + 1
    return st.one_of(
        st.integers(0, npages),
        st.builds(lambda k, d: min(max(k * WORD + d, 0), npages),
                  st.integers(0, nwords), st.integers(-2, 2)),
        st.sampled_from([0, npages, max(npages - 1, 0)]),
    )


def page_in(npages):
    """A valid page index (npages must be > 0)."""
    return position(npages).map(lambda p: min(p, npages - 1))


def range_in(npages):
    """(first, stop) with 0 <= first <= stop <= npages; may be empty."""
    return st.one_of(
        st.tuples(position(npages), position(npages)).map(lambda t: tuple(sorted(t))),
        # short ranges straddling a word boundary
        st.builds(lambda k, a, b: (min(max(k * WORD - a, 0), npages),
                                   min(max(k * WORD + b, 0), npages)),
                  st.integers(0, npages // WORD + 1), st.integers(0, 3), st.integers(0, 3)),
    )


REASONS = st.one_of(
    st.none(),
    st.text(max_size=20),                         # any unicode, incl. NUL, astral
    st.sampled_from(["", "overflow", "fork: ré-sync ✓", "𝄞 lost"]),
)


@st.composite
def set_ops(draw, npages):
    """A recipe for building a set: pages, ranges, and possibly a lost mark."""
    pages = draw(st.lists(page_in(npages), max_size=40)) if npages else []
    ranges = draw(st.lists(range_in(npages), max_size=8))
    full = draw(st.integers(0, 15)) == 0
    if full:
        ranges.append((0, npages))
    if npages and draw(st.integers(0, 3)) == 0:
        # a strided stretch (every 2nd..5th page): dense in bits but rich in
        # runs, so the bitmap encoding wins
        first, stop = draw(range_in(npages))
        pages += range(first, stop, draw(st.integers(2, 5)))
    reason = draw(REASONS) if draw(st.integers(0, 5)) == 0 else None
    return pages, ranges, reason


@st.composite
def set_and_model(draw, npages=None):
    if npages is None:
        npages = draw(NPAGES)
    pages, ranges, reason = draw(set_ops(npages))
    d, m = DirtySet(npages), Model(npages)
    for p in pages:
        d.add(p)
        m.add(p)
    for first, stop in ranges:
        d.add_range(first, stop)
        m.add_range(first, stop)
    if reason is not None:
        d.mark_lost(reason)
        m.mark_lost(reason)
    return d, m


@st.composite
def sorted_runs(draw, npages):
    """Runs in ascending order of `first` that may be empty, touch the
    previous run, overlap or nest inside it, or leave a gap: append() must
    merge them into maximal runs."""
    runs = []
    for _ in range(draw(st.integers(0, 12))):
        lo = runs[-1][0] if runs else 0
        prev_stop = runs[-1][1] if runs else 0
        mode = draw(st.sampled_from(["touch", "overlap", "gap", "boundary"]))
        if mode == "touch":
            first = prev_stop
        elif mode == "overlap":
            first = draw(st.integers(lo, prev_stop))
        elif mode == "gap":
            first = draw(st.integers(prev_stop, npages))
        else:
            first = max(draw(position(npages)), lo)
        length = draw(st.one_of(st.integers(0, 3), st.integers(0, 200),
                                st.integers(0, max(npages - first, 0))))
        runs.append((first, min(npages, first + length)))
    return runs


# --------------------------------------------------------------------------
# Model and reference codec
# --------------------------------------------------------------------------

def join_reasons(a, b):
    """Reasons are "; "-joined parts, each said once."""
    if a is None:
        return b
    if b is None:
        return a
    parts = a.split("; ")
    for part in b.split("; "):
        if part not in parts:
            parts.append(part)
    return "; ".join(parts)


class Model:
    def __init__(self, npages, pages=(), reason=None):
        self.npages = npages
        self.pages = set(pages)
        self.reason = reason

    def add(self, page):
        assert 0 <= page < self.npages
        self.pages.add(page)

    def add_range(self, first, stop):
        self.pages.update(range(first, stop))

    def mark_lost(self, reason):
        self.reason = join_reasons(self.reason, str(reason))
        self.pages = set(range(self.npages))

    def clear(self):
        self.pages = set()
        self.reason = None

    def copy(self):
        return Model(self.npages, self.pages, self.reason)

    def merge(self, other):
        self.pages |= other.pages
        self.reason = join_reasons(self.reason, other.reason)

    def ranges(self):
        return ranges_of(self.pages)

    def __eq__(self, other):
        return (self.npages, self.pages, self.reason) == (other.npages, other.pages, other.reason)


def ranges_of(pages):
    out = []
    for p in sorted(pages):
        if out and out[-1][1] == p:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1])
    return [tuple(r) for r in out]


def varint(v):
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def ref_parts(npages, ranges, reason):
    """(header, runs body, bitmap body) per the documented wire format."""
    header = b"DT\x01" + b"\x00" + (b"\x01" if reason is not None else b"\x00") + varint(npages)
    if reason is not None:
        r = reason.encode("utf-8")
        header += varint(len(r)) + r
    runs = bytearray(varint(len(ranges)))
    prev = 0
    for first, stop in ranges:
        runs += varint(first - prev) + varint(stop - first)
        prev = stop
    mask = 0
    for first, stop in ranges:
        mask |= ((1 << (stop - first)) - 1) << first
    bitmap = mask.to_bytes((npages + 7) // 8, "little")
    return header, bytes(runs), bitmap


def ref_encode(npages, ranges, reason):
    header, runs, bitmap = ref_parts(npages, ranges, reason)
    if len(runs) <= len(bitmap):
        return header[:3] + b"\x00" + header[4:] + runs
    return header[:3] + b"\x01" + header[4:] + bitmap


class Malformed(Exception):
    pass


def ref_decode(data):
    """Reference decoder: (npages, ranges, reason) or Malformed.

    Strictness mirrors what the format promises: runs non-empty, ascending,
    non-adjacent and inside [0, npages); no bitmap bits beyond npages; no
    trailing bytes; varints fit in 64 bits; npages <= 2**40.
    """
    data = bytes(data)
    pos = 0

    def get():
        nonlocal pos
        v = shift = 0
        for n in range(10):
            if pos >= len(data):
                raise Malformed("truncated varint")
            b = data[pos]
            pos += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                if v >= 1 << 64:
                    raise Malformed("varint overflow")
                return v
        raise Malformed("varint too long")

    if len(data) < 6 or data[:2] != b"DT" or data[2] != 1:
        raise Malformed("header")
    kind, flags = data[3], data[4]
    if kind not in (0, 1) or flags & ~1:
        raise Malformed("kind/flags")
    pos = 5
    npages = get()
    if npages > MAX_PAGES:
        raise Malformed("npages")
    reason = None
    if flags & 1:
        n = get()
        if n > len(data) - pos:
            raise Malformed("reason")
        reason = data[pos:pos + n].decode("utf-8", "replace")
        pos += n
    ranges = []
    if kind == 0:
        nruns = get()
        cur = 0
        i = 0
        while i < nruns:
            gap, length = get(), get()
            if length == 0 or cur + gap + length > npages or (i and gap == 0):
                raise Malformed("run")
            ranges.append((cur + gap, cur + gap + length))
            cur += gap + length
            i += 1
    else:
        body = (npages + 7) // 8
        if len(data) - pos < body:
            raise Malformed("bitmap truncated")
        chunk = data[pos:pos + body]
        pos += body
        if npages & 7 and chunk[-1] >> (npages & 7):
            raise Malformed("bits beyond npages")
        mask = int.from_bytes(chunk, "little")
        ranges = ranges_of(i for i in range(npages) if mask >> i & 1) if mask else []
    if pos != len(data):
        raise Malformed("trailing")
    if reason is not None:
        ranges = [(0, npages)] if npages else []
    return npages, ranges, reason


def claimed_npages(data):
    """npages as written in an encoding's header, or None if unreadable."""
    data = bytes(data)
    v = shift = 0
    for b in data[5:15]:
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v
    return None


def note_event(text):
    """hypothesis.event() (see --hypothesis-show-statistics), also usable
    from the plain, non-hypothesis tests below."""
    if currently_in_test_context():
        event(text)


# --------------------------------------------------------------------------
# The central check: every observable of a DirtySet against the model
# --------------------------------------------------------------------------

def probes(npages):
    if npages <= 600:
        ps = set(range(-2, npages + 3))
    else:
        ps = set(range(-2, 300))
        ps |= {k * WORD + d for k in range(npages // WORD + 2) for d in (-1, 0, 1)}
        ps |= set(range(npages - 3, npages + 3))
    return ps | {2 ** 63, 2 ** 64, 2 ** 70}


def check(d, m):
    assert d.npages == m.npages
    expected_pages = sorted(m.pages)
    expected_ranges = m.ranges()
    assert d.count == len(d) == len(expected_pages)
    assert bool(d) is bool(expected_pages)
    assert d.lost is (m.reason is not None)
    assert d.lost_reason == m.reason
    if m.reason is not None:
        assert d.count == d.npages
    assert d.pages() == expected_pages
    assert list(d) == expected_pages
    ranges = d.ranges()
    assert ranges == expected_ranges
    # maximal runs: ascending, non-empty, non-adjacent, inside [0, npages)
    for (f1, s1), (f2, s2) in zip(ranges, ranges[1:]):
        assert s1 < f2
    assert all(0 <= f < s <= d.npages for f, s in ranges)
    rl = d.runs()
    assert isinstance(rl, RunList)
    assert rl.npages == d.npages
    assert list(rl) == expected_ranges
    assert len(rl) == len(expected_ranges)
    assert rl.count == len(expected_pages)
    assert rl.lost_reason == m.reason and rl.lost is d.lost
    for p in probes(m.npages):
        assert (p in d) is (p in m.pages), p
    assert "x" not in d and None not in d and 1.0 not in d


def check_encoding(d, m):
    """encode() matches the reference byte for byte, is the smaller of the two
    bodies, and decodes back to an equal set."""
    enc = d.encode()
    assert isinstance(enc, bytes)
    note_event(f"encoding kind={'runs' if enc[3] == 0 else 'bitmap'}"
          f"{' lost' if m.reason is not None else ''}"
          f", npages {'0' if not m.npages else '<=300' if m.npages <= 300 else '>300'}")
    header, runs, bitmap = ref_parts(m.npages, m.ranges(), m.reason)
    assert len(enc) == len(header) + min(len(runs), len(bitmap))
    # never larger than a raw bitmap plus a bounded header
    reason_len = len(m.reason.encode()) if m.reason is not None else 0
    header_bound = 5 + 10 + (10 + reason_len if m.reason is not None else 0)
    assert len(enc) <= (m.npages + 7) // 8 + header_bound
    assert enc == ref_encode(m.npages, m.ranges(), m.reason)
    # wire(): the same choice, the body alone (what MappingDirty carries), the count
    form, body, count = d.wire()
    assert form == ("runs" if enc[3] == 0 else "bitmap")
    assert body == (runs[len(varint(len(m.ranges()))):] if form == "runs" else bitmap)
    assert count == len(m.pages)
    back = DirtySet.decode(enc)
    assert back == d
    check(back, m)
    # decode accepts any buffer, not only bytes
    assert DirtySet.decode(bytearray(enc)) == d
    assert DirtySet.decode(memoryview(enc)) == d
    return enc


def check_decode_input(data):
    """Malformed -> ValueError; accepted -> a valid set equal to the reference."""
    try:
        expected = ref_decode(data)
    except Malformed:
        expected = None
    claim = claimed_npages(data)
    if expected is not None and claim is not None and claim > 1 << 24:
        # A *valid* encoding of a huge, mostly empty set: decoding it would
        # allocate (and checking it scan) gigabytes per example. Malformed
        # ones with huge claims are still fed to decode (and must be cheap).
        return None
    note_event("decode: reference accepts" if expected is not None else "decode: reference rejects")
    try:
        d = DirtySet.decode(data)
    except ValueError:
        assert expected is None, f"decode rejected input the format allows: {bytes(data)!r}"
        return None
    assert expected is not None, f"decode accepted malformed input: {bytes(data)!r} -> {d!r}"
    npages, ranges, reason = expected
    assert d.npages == npages
    assert d.lost_reason == reason
    assert d.ranges() == ranges
    assert all(0 <= p < d.npages for p in d.pages())
    assert d.count == sum(s - f for f, s in ranges) <= d.npages
    # the result is a fully working set: it re-encodes canonically
    m = Model(npages, (p for f, s in ranges for p in range(f, s)), reason)
    check(d, m)
    check_encoding(d, m)
    return d


# --------------------------------------------------------------------------
# DirtySet vs model
# --------------------------------------------------------------------------

@SETTINGS
@given(set_and_model())
def test_built_set_matches_model(dm):
    d, m = dm
    check(d, m)


@SETTINGS
@given(st.data())
def test_add_and_add_range_step_by_step(data):
    npages = data.draw(NPAGES, label="npages")
    d, m = DirtySet(npages), Model(npages)
    check(d, m)
    for _ in range(data.draw(st.integers(1, 12), label="steps")):
        if npages and data.draw(st.booleans()):
            p = data.draw(page_in(npages), label="page")
            d.add(p)
            m.add(p)
        else:
            first, stop = data.draw(range_in(npages), label="range")
            d.add_range(first, stop)
            m.add_range(first, stop)
        check(d, m)


@SETTINGS
@given(st.data())
def test_from_pages(data):
    npages = data.draw(NPAGES)
    pages = data.draw(st.lists(page_in(npages), max_size=60)) if npages else []
    d = DirtySet.from_pages(npages, iter(pages))
    check(d, Model(npages, pages))
    assert d == DirtySet.from_pages(npages, sorted(set(pages), reverse=True))


@SETTINGS
@given(st.data())
def test_union_and_inplace_union(data):
    npages = data.draw(NPAGES)
    a, ma = data.draw(set_and_model(npages))
    b, mb = data.draw(set_and_model(npages))
    a_before, b_before = a.copy(), b.copy()

    u = a | b
    mu = ma.copy()
    mu.merge(mb)
    check(u, mu)
    assert u is not a and u is not b
    assert a == a_before and b == b_before        # operands untouched
    check(a, ma)
    check(b, mb)

    # union is commutative on pages (reasons join in operand order)
    v = b | a
    assert v.pages() == u.pages()
    assert v.lost is u.lost

    same = a
    a |= b
    assert a is same                              # in place
    check(a, mu)
    assert a == u
    check(b, mb)

    # idempotent on pages; merging with itself changes nothing at all
    a |= b
    mu.merge(mb)                                  # reasons join again
    check(a, mu)
    assert a.pages() == u.pages()
    a |= a
    check(a, mu)


@SETTINGS
@given(st.data())
def test_copy_is_independent(data):
    npages = data.draw(NPAGES)
    d, m = data.draw(set_and_model(npages))
    c = d.copy()
    assert c == d and c is not d
    check(c, m)
    mc = m.copy()
    # mutate the copy; the original must not move
    first, stop = data.draw(range_in(npages))
    c.add_range(first, stop)
    mc.add_range(first, stop)
    if npages:
        p = data.draw(page_in(npages))
        c.add(p)
        mc.add(p)
    if data.draw(st.booleans()):
        c.mark_lost("copy only")
        mc.mark_lost("copy only")
    check(c, mc)
    check(d, m)
    # and the other way round
    d.clear()
    m.clear()
    check(d, m)
    check(c, mc)


@SETTINGS
@given(set_and_model())
def test_clear(dm):
    d, m = dm
    d.clear()
    m.clear()
    check(d, m)
    assert d == DirtySet(m.npages)
    check_encoding(d, m)
    # still usable afterwards
    if m.npages:
        d.add(m.npages - 1)
        m.add(m.npages - 1)
        check(d, m)


@SETTINGS
@given(st.data())
def test_equality_matches_model(data):
    npages = data.draw(NPAGES)
    a, ma = data.draw(set_and_model(npages))
    if data.draw(st.booleans()):
        b, mb = data.draw(set_and_model(npages))
    else:  # an equal set built a different way: via its runs
        b, mb = DirtySet(npages), ma.copy()
        for first, stop in reversed(ma.ranges()):
            b.add_range(first, stop)
        if ma.reason is not None:
            b.mark_lost(ma.reason)
    assert (a == b) is (ma == mb)
    assert (a != b) is (ma != mb)
    assert a == a.copy()
    assert (a == 0) is False and (a == set(ma.pages)) is False
    other = DirtySet(npages + 1)
    assert a != other
    with pytest.raises(TypeError):
        hash(a)


def test_edge_shapes():
    """Empty, full and single-page sets around word boundaries, exhaustively."""
    for npages in BOUNDARY_SIZES + [300]:
        shapes = [Model(npages), Model(npages, range(npages))]
        for p in {0, npages - 1, 63, 64, 65, 127, 128}:
            if 0 <= p < npages:
                shapes.append(Model(npages, [p]))
                shapes.append(Model(npages, set(range(npages)) - {p}))
        for m in shapes:
            d = DirtySet.from_pages(npages, m.pages)
            check(d, m)
            check_encoding(d, m)


def test_every_range_in_small_sets():
    """add_range of every [first, stop) in sets of 0..130 pages."""
    for npages in (0, 1, 63, 64, 65, 128, 130):
        for first in range(npages + 1):
            for stop in range(first, npages + 1):
                d = DirtySet(npages)
                d.add_range(first, stop)
                assert d.ranges() == ([(first, stop)] if stop > first else [])
                assert d.count == stop - first
    # one set with two ranges on either side of every boundary
    for k in range(1, 5):
        d = DirtySet(320)
        d.add_range(k * 64 - 1, k * 64)
        d.add_range(k * 64 + 1, k * 64 + 2)
        assert d.ranges() == [(k * 64 - 1, k * 64), (k * 64 + 1, k * 64 + 2)]
        d.add(k * 64)
        assert d.ranges() == [(k * 64 - 1, k * 64 + 2)]


# --------------------------------------------------------------------------
# RunList
# --------------------------------------------------------------------------

def runs_model(npages, runs):
    pages = set()
    for first, stop in runs:
        pages.update(range(first, stop))
    return Model(npages, pages)


@SETTINGS
@given(st.data())
def test_runlist_matches_model(data):
    npages = data.draw(NPAGES)
    runs = data.draw(sorted_runs(npages))
    rl = RunList(npages)
    assert (len(rl), rl.count, list(rl), rl.lost, rl.lost_reason) == (0, 0, [], False, None)
    for first, stop in runs:
        rl.append(first, stop)
    m = runs_model(npages, runs)
    assert rl.npages == npages
    assert list(rl) == m.ranges()                 # merged: maximal, non-adjacent
    assert len(rl) == len(m.ranges())
    assert rl.count == len(m.pages)
    assert not rl.lost and rl.lost_reason is None
    d = rl.to_dirtyset()
    check(d, m)
    # iterating does not consume
    assert list(rl) == list(rl)


@SETTINGS
@given(st.data())
def test_runlist_prefix_merging(data):
    """After each append, the list equals the model of the prefix appended."""
    npages = data.draw(NPAGES)
    runs = data.draw(sorted_runs(npages))
    rl = RunList(npages)
    for i, (first, stop) in enumerate(runs):
        rl.append(first, stop)
        assert list(rl) == runs_model(npages, runs[:i + 1]).ranges()


@SETTINGS
@given(st.data())
def test_add_runs_into_nonempty_set(data):
    npages = data.draw(NPAGES)
    d, m = data.draw(set_and_model(npages))
    runs = data.draw(sorted_runs(npages))
    reason = data.draw(REASONS) if data.draw(st.integers(0, 4)) == 0 else None
    rl = RunList(npages, lost_reason=reason)
    for first, stop in runs:
        rl.append(first, stop)
    before = list(rl)
    d.add_runs(rl)
    if reason is not None:
        m.mark_lost(reason)        # a lost list covers the region: same as mark_lost
    else:
        m.merge(runs_model(npages, runs))
    check(d, m)
    assert list(rl) == before                     # the list is not consumed
    # adding the same runs again changes no page (a lost list's reason is
    # joined again, exactly as the first time)
    pages = d.pages()
    d.add_runs(rl)
    if reason is not None:
        m.mark_lost(reason)
    check(d, m)
    assert d.pages() == pages


@SETTINGS
@given(NPAGES, REASONS.filter(lambda r: r is not None), st.data())
def test_lost_runlist(npages, reason, data):
    rl = RunList(npages, lost_reason=reason)
    assert rl.lost and rl.lost_reason == reason
    full = [(0, npages)] if npages else []
    assert list(rl) == full and rl.count == npages and len(rl) == len(full)
    # appending to a lost list keeps it whole
    for first, stop in data.draw(sorted_runs(npages)):
        rl.append(first, stop)
    assert list(rl) == full
    d = rl.to_dirtyset()
    m = Model(npages)
    m.mark_lost(reason)
    check(d, m)
    check_encoding(d, m)


@SETTINGS
@given(set_and_model())
def test_runs_round_trip_through_runlist(dm):
    d, m = dm
    rl = d.runs()
    back = rl.to_dirtyset()
    check(back, m)
    assert back == d


# --------------------------------------------------------------------------
# Lost state and reasons
# --------------------------------------------------------------------------

@SETTINGS
@given(st.data())
def test_lost_reasons_join_on_merge(data):
    npages = data.draw(NPAGES)
    ra = data.draw(REASONS)
    rb = data.draw(REASONS)
    a, ma = DirtySet(npages, lost_reason=ra), Model(npages)
    b, mb = DirtySet(npages, lost_reason=rb), Model(npages)
    if ra is not None:
        ma.mark_lost(ra)
    if rb is not None:
        mb.mark_lost(rb)
    check(a, ma)
    check(b, mb)
    u = a | b
    mu = ma.copy()
    mu.merge(mb)
    check(u, mu)
    if ra is not None and rb is not None and ra != rb:
        assert ra in u.lost_reason and rb in u.lost_reason
    # marking the same reason twice does not repeat it
    if ra is not None:
        a.mark_lost(ra)
        check(a, ma)


def test_lost_reason_is_str_of_argument():
    d = DirtySet(70, lost_reason=42)
    assert d.lost_reason == "42" and d.count == 70
    rl = RunList(70, lost_reason=OSError("gone"))
    assert rl.lost_reason == "gone"


# --------------------------------------------------------------------------
# Wire encoding
# --------------------------------------------------------------------------

@SETTINGS
@given(set_and_model())
def test_encode_decode_round_trip(dm):
    d, m = dm
    check_encoding(d, m)


@SETTINGS
@given(NPAGES, st.text(max_size=30))
def test_round_trip_lost_with_unicode_reason(npages, reason):
    d = DirtySet(npages)
    if npages:
        d.add(npages // 2)
    d.mark_lost(reason)
    m = Model(npages)
    m.mark_lost(reason)
    enc = check_encoding(d, m)
    assert DirtySet.decode(enc).lost_reason == reason


@SETTINGS
@given(NPAGES, st.data())
def test_encoding_picks_the_smaller_body(npages, data):
    """Dense and alternating patterns (bitmap wins) as well as sparse ones."""
    step = data.draw(st.integers(1, 4))
    offset = data.draw(st.integers(0, 3))
    m = Model(npages, range(offset, npages, step))
    d = DirtySet.from_pages(npages, m.pages)
    enc = check_encoding(d, m)
    header, runs, bitmap = ref_parts(npages, m.ranges(), None)
    assert enc[3] == (0 if len(runs) <= len(bitmap) else 1)


# -- decode fuzzing ---------------------------------------------------------

@FUZZ_SETTINGS
@given(st.binary(max_size=64))
def test_decode_random_bytes(data):
    check_decode_input(data)


@FUZZ_SETTINGS
@given(st.binary(max_size=48))
def test_decode_random_bytes_with_valid_header(body):
    # get past the magic/version check so the body parser is exercised
    for kind in (0, 1):
        for flags in (0, 1):
            check_decode_input(b"DT\x01" + bytes([kind, flags]) + body)


@FUZZ_SETTINGS
@given(st.data())
def test_decode_mutated_encodings(data):
    npages = data.draw(st.one_of(st.integers(0, 300), st.sampled_from(BOUNDARY_SIZES)))
    d, m = data.draw(set_and_model(npages))
    enc = bytearray(d.encode())
    how = data.draw(st.sampled_from(["replace", "flip", "truncate", "delete", "insert", "extend"]))
    i = data.draw(st.integers(0, len(enc) - 1))
    if how == "replace":
        enc[i] = data.draw(st.integers(0, 255))
    elif how == "flip":
        enc[i] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "truncate":
        del enc[i:]
    elif how == "delete":
        del enc[i]
    elif how == "insert":
        enc.insert(i, data.draw(st.integers(0, 255)))
    else:
        enc += data.draw(st.binary(min_size=1, max_size=4))
    check_decode_input(bytes(enc))


def test_decode_every_truncation_and_bit_flip():
    """Exhaustive single-bit flips and truncations of a few encodings."""
    samples = [
        DirtySet(0),
        DirtySet(1, lost_reason="é"),
        DirtySet.from_pages(130, [0, 63, 64, 65, 129]),          # runs
        DirtySet.from_pages(130, range(0, 130, 2)),               # bitmap
        DirtySet.from_pages(70000, [0, 4095, 4096, 69999]),       # multi-byte varints
        DirtySet(200, lost_reason="lost: 𝄞"),
    ]
    for d in samples:
        enc = d.encode()
        assert DirtySet.decode(enc) == d
        for n in range(len(enc)):
            with pytest.raises(ValueError):
                DirtySet.decode(enc[:n])
        with pytest.raises(ValueError):
            DirtySet.decode(enc + b"\x00")
        for i in range(len(enc)):
            for bit in range(8):
                mutated = bytearray(enc)
                mutated[i] ^= 1 << bit
                check_decode_input(bytes(mutated))


@pytest.mark.parametrize("data, why", [
    (b"", "empty"),
    (b"DT\x01\x00\x00", "too short"),
    (b"XT\x01\x00\x00\x00", "magic"),
    (b"DT\x02\x00\x00\x00", "version"),
    (b"DT\x01\x02\x00\x00", "kind"),
    (b"DT\x01\x00\x02\x00\x00", "flag"),
    (b"DT\x01\x00\x00\x0a\x01\x00\x00", "zero-length run"),
    (b"DT\x01\x00\x00\x0a\x02\x00\x02\x00\x02", "adjacent runs"),
    (b"DT\x01\x00\x00\x0a\x01\x09\x02", "run past npages"),
    (b"DT\x01\x00\x00\x0a\x01\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01\x01", "gap overflow"),
    (b"DT\x01\x00\x00\x0a\x01\x00\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", "length overflow"),
    (b"DT\x01\x00\x00\x0a\x02\x00\x05\x01" + varint(2 ** 64 - 6), "pos+gap+length overflow"),
    (b"DT\x01\x01\x00\x0a\xff\x04", "bitmap bit beyond npages"),
    (b"DT\x01\x01\x00\x0a\xff", "bitmap truncated"),
    (b"DT\x01\x00\x01\x0a\x05ab", "reason truncated"),
    (b"DT\x01\x00\x00\x0a\x00\x00", "trailing byte"),
    (b"DT\x01\x00\x00" + b"\x80" * 10 + b"\x00\x00", "npages varint too long"),
    (b"DT\x01\x00\x00" + varint(MAX_PAGES + 1) + b"\x00", "npages above maximum"),
])
def test_decode_rejects(data, why):
    with pytest.raises(ValueError):
        DirtySet.decode(data)
    with pytest.raises(Malformed):
        ref_decode(data)


def test_decode_accepts_noncanonical_but_valid():
    # invalid UTF-8 in a reason is replaced, not an error
    d = DirtySet.decode(b"DT\x01\x00\x01\x03\x01\xff\x01\x00\x03")
    assert d.lost and d.lost_reason == "\ufffd" and d.count == 3
    # a bitmap body even where runs would be smaller is still understood
    d = DirtySet.decode(b"DT\x01\x01\x00\x40\x01" + bytes(7))
    assert d.pages() == [0]
    assert d.encode() == b"DT\x01\x00\x00\x40\x01\x00\x01"
    # an over-long (but 64-bit) varint is read by value
    d = DirtySet.decode(b"DT\x01\x00\x00\x8a\x00\x01\x80\x00\x02")
    assert d.npages == 10 and d.pages() == [0, 1]


_HUGE_CLAIM_SCRIPT = textwrap.dedent(r"""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (1 << 31, 1 << 31))   # 2 GiB
    from dirtytrack import DirtySet
    def varint(v):
        out = bytearray()
        while v >= 0x80:
            out.append((v & 0x7f) | 0x80); v >>= 7
        out.append(v); return bytes(out)
    bad = []
    for npages in (1 << 33, 1 << 36, 1 << 40):
        for kind, body in ((1, b""), (1, b"\xff"), (0, b"\x01"), (0, b"\x01\x00")):
            data = b"DT\x01" + bytes([kind, 0]) + varint(npages) + body
            try:
                DirtySet.decode(data)
                bad.append((data, "accepted"))
            except ValueError:
                pass
            except BaseException as e:
                bad.append((data, type(e).__name__))
    print(bad)
    sys.exit(1 if bad else 0)
""")


def test_decode_huge_claim_malformed_is_valueerror():
    """A short malformed encoding claiming a huge page count must be rejected
    with ValueError, without first allocating the bitmap it claims (the
    core at f882e3e/24634e7 allocated first: MemoryError for 2**36+ pages).

    Run in a child with a 2 GiB address-space limit so the outcome does not
    depend on how much memory (or overcommit) the test machine has."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", _HUGE_CLAIM_SCRIPT],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------
# Error cases
# --------------------------------------------------------------------------

@SETTINGS
@given(set_and_model(), st.data())
def test_out_of_range_add_raises_and_leaves_set_unchanged(dm, data):
    d, m = dm
    n = m.npages
    bad_page = data.draw(st.one_of(st.just(n), st.integers(n, n + 200), st.just(2 ** 64 - 1)))
    with pytest.raises(IndexError):
        d.add(bad_page)
    first = data.draw(st.integers(0, n))
    with pytest.raises(IndexError):
        d.add_range(first, n + data.draw(st.integers(1, 100)))
    if first > 0:
        with pytest.raises(IndexError):                 # first > stop
            d.add_range(first, first - 1)
    with pytest.raises(IndexError):
        d.add_range(n + 1, n + 1)
    # not representable as a page index at all (negative / >= 2**64)
    for p in (-1, 2 ** 64):
        with pytest.raises((IndexError, OverflowError)):
            d.add(p)
        with pytest.raises((IndexError, OverflowError)):
            d.add_range(p, p)
    with pytest.raises((IndexError, OverflowError)):
        DirtySet.from_pages(n, [0, n] if n else [0])
    check(d, m)


@SETTINGS
@given(st.data())
def test_merging_different_npages_raises(data):
    n1 = data.draw(NPAGES)
    n2 = data.draw(NPAGES.filter(lambda n: n != n1))
    a, ma = data.draw(set_and_model(n1))
    b, mb = data.draw(set_and_model(n2))
    with pytest.raises(ValueError):
        a | b
    with pytest.raises(ValueError):
        a |= b
    rl = RunList(n2)
    if n2:
        rl.append(0, 1)
    with pytest.raises(ValueError):
        a.add_runs(rl)
    check(a, ma)
    check(b, mb)
    with pytest.raises(TypeError):
        a | set()
    with pytest.raises(TypeError):
        a |= [1]
    with pytest.raises(TypeError):
        a.add_runs(None)


@SETTINGS
@given(st.data())
def test_runlist_out_of_order_append_raises(data):
    npages = data.draw(st.integers(4, 70000))
    runs = data.draw(sorted_runs(npages))
    rl = RunList(npages)
    for first, stop in runs:
        rl.append(first, stop)
    before = list(rl)
    assume(before and before[-1][0] > 0)
    last_first = before[-1][0]
    first = data.draw(st.integers(0, last_first - 1))
    stop = data.draw(st.integers(first + 1, last_first))
    with pytest.raises(ValueError):
        rl.append(first, stop)
    assert list(rl) == before                          # unchanged
    # outside the region, or first > stop
    with pytest.raises(ValueError):
        rl.append(before[-1][1], npages + 1)
    with pytest.raises(ValueError):
        rl.append(npages, npages - 1)
    assert list(rl) == before


def test_runlist_simple_errors():
    rl = RunList(100)
    rl.append(10, 20)
    with pytest.raises(ValueError):
        rl.append(0, 5)
    with pytest.raises(ValueError):
        rl.append(50, 101)
    with pytest.raises(ValueError):
        rl.append(60, 59)
    rl.append(20, 30)                                  # touching: merged
    rl.append(25, 40)                                  # overlapping: merged
    rl.append(41, 41)                                  # empty: ignored
    assert list(rl) == [(10, 40)] and rl.count == 30 and len(rl) == 1
    with pytest.raises(ValueError):
        DirtySet(MAX_PAGES + 1)


# --------------------------------------------------------------------------
# Stateful: a random mix of operations against the model
# --------------------------------------------------------------------------

class DirtySetMachine(RuleBasedStateMachine):
    others = Bundle("others")

    @initialize(npages=st.one_of(st.integers(0, 300), st.integers(0, 300),
                                 st.sampled_from(BOUNDARY_SIZES + [70000])))
    def start(self, npages):
        self.npages = npages
        self.d = DirtySet(npages)
        self.m = Model(npages)

    @precondition(lambda self: self.npages > 0)
    @rule(data=st.data())
    def add(self, data):
        p = data.draw(page_in(self.npages))
        self.d.add(p)
        self.m.add(p)

    @rule(data=st.data())
    def add_range(self, data):
        first, stop = data.draw(range_in(self.npages))
        self.d.add_range(first, stop)
        self.m.add_range(first, stop)

    @rule(data=st.data())
    def add_runs(self, data):
        runs = data.draw(sorted_runs(self.npages))
        rl = RunList(self.npages)
        for first, stop in runs:
            rl.append(first, stop)
        self.d.add_runs(rl)
        self.m.merge(runs_model(self.npages, runs))

    @rule(target=others, data=st.data())
    def make_other(self, data):
        return data.draw(set_and_model(self.npages))

    @rule(other=others)
    def merge_in_place(self, other):
        o, mo = other
        snapshot = o.copy()
        self.d |= o
        self.m.merge(mo)
        assert o == snapshot

    @rule(other=others)
    def merge_new(self, other):
        o, mo = other
        old = self.d
        self.d = self.d | o
        self.m.merge(mo)
        assert self.d is not old

    @rule(target=others)
    def snapshot(self):
        # a copy taken now must not follow later changes of the main set
        return self.d.copy(), self.m.copy()

    @rule(reason=REASONS.filter(lambda r: r is not None))
    def mark_lost(self, reason):
        self.d.mark_lost(reason)
        self.m.mark_lost(reason)

    @rule()
    def clear(self):
        self.d.clear()
        self.m.clear()

    @rule()
    def encode_decode(self):
        enc = self.d.encode()
        assert enc == ref_encode(self.npages, self.m.ranges(), self.m.reason)
        self.d = DirtySet.decode(enc)

    @rule()
    def via_runs(self):
        self.d = self.d.runs().to_dirtyset()
        # a RunList carries the reason, to_dirtyset keeps it

    @rule(data=st.data())
    def bad_add(self, data):
        p = data.draw(st.integers(self.npages, self.npages + 130))
        with pytest.raises(IndexError):
            self.d.add(p)
        with pytest.raises(IndexError):
            self.d.add_range(0, p + 1)

    @invariant()
    def matches_model(self):
        if hasattr(self, "d"):
            check(self.d, self.m)

    @rule(other=others)
    def other_still_matches(self, other):
        # snapshots and merged-in operands keep their own contents
        check(*other)


DirtySetMachine.TestCase.settings = settings(
    max_examples=60 * SCALE, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)
TestDirtySetMachine = DirtySetMachine.TestCase
