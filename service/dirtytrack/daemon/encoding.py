"""Cursor sets -> dirtytrack.v1 messages.

Each mapping's pages go out as runs or a bitmap, whichever is smaller. Both
come straight from DirtySet.wire(), one pass without the GIL that also counts
the pages: its body is already (gap, length) LEB128 pairs or an LSB-first
bitmap, exactly the wire forms of MappingDirty.runs / .bitmap, so no Python
loop touches a page. A
mapping whose encoding exceeds the message budget is split into page ranges
(first_page, npages), and pieces are packed into chunks below the limit.
"""
from __future__ import annotations

from dirtytrack._core import PAGE_SIZE, DirtySet
from dirtytrack.v1 import dirtytrack_pb2 as pb

STATUS = {"tracking": pb.MAPPING_STATUS_TRACKING, "new": pb.MAPPING_STATUS_NEW,
          "lost": pb.MAPPING_STATUS_LOST, "removed": pb.MAPPING_STATUS_REMOVED}
PIECE_OVERHEAD = 256          # bytes of a MappingDirty besides its pages (generous)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def pieces(d: DirtySet, budget: int):
    """(first_page, npages, form, body, count) covering the set, each body <= budget."""
    form, body, count = d.wire()
    if len(body) <= budget:
        yield 0, d.npages, form, body, count
        return
    if form == "bitmap":
        step = max(1, budget // 8) * 8             # bytes, a multiple of 64 pages
        for lo in range(0, len(body), step):
            part = body[lo:lo + step]
            first = lo * 8
            yield (first, min(d.npages - first, len(part) * 8), "bitmap", part,
                   int.from_bytes(part, "little").bit_count())
        return
    # Runs too long for one message (> ~budget/3 runs): cut at run boundaries,
    # each piece's first gap counted from its own first_page. Rare, and Python.
    out, count, piece_first, pos, page = bytearray(), 0, 0, 0, 0
    while pos < len(body):
        gap, pos = _varint(body, pos)
        length, pos = _varint(body, pos)
        start = page + gap
        if len(out) + 20 > budget:
            yield piece_first, start - piece_first, "runs", bytes(out), count
            out, count, piece_first = bytearray(), 0, start
        _put_varint(out, start - max(page, piece_first))
        _put_varint(out, length)
        count += length
        page = start + length
    yield piece_first, d.npages - piece_first, "runs", bytes(out), count


def encode_set(state, *, cursor_id: str, target_id: str, seq: int,
               max_bytes: int) -> list[pb.DirtySetChunk]:
    """The chunks of one set, each serialising below max_bytes."""
    budget = max(4096, max_bytes - 4 * PIECE_OVERHEAD)
    # Encoded first: the pieces carry the page counts the header needs.
    encoded = [(mapping_id, owed, list(pieces(owed.dirty, budget)))
               for mapping_id, owed in sorted(state.mappings.items())]
    common = dict(cursor_id=cursor_id, target_id=target_id, seq=seq, page_size=PAGE_SIZE,
                  full_resync=state.full_resync, target_exited=state.exited,
                  set_dirty_pages=sum(p[4] for _, _, ps in encoded for p in ps),
                  scans=state.scans,
                  scan_started_monotonic_ns=state.scan_mono_ns,
                  scan_started_unix_nanos=state.scan_unix_ns)
    chunks = [pb.DirtySetChunk(**common, chunk_index=0)]
    size, empty = chunks[0].ByteSize(), True

    def make_room(need: int) -> pb.DirtySetChunk:
        # Every entry - resync reasons and removed mappings included - counts
        # against the limit: a client away while malloc churned through
        # thousands of mmaps must still get its set, in more chunks.
        nonlocal size, empty
        if size + need > max_bytes and not empty:
            chunks.append(pb.DirtySetChunk(**common, chunk_index=len(chunks)))
            size = chunks[-1].ByteSize()
        size += need
        empty = False
        return chunks[-1]

    for code, msg in state.resync:
        entry = pb.Resync(code=code, message=msg)
        make_room(entry.ByteSize() + 8).resync.append(entry)
    for mapping_id, (m, reason) in sorted(state.removed.items()):
        entry = pb.RemovedMapping(mapping_id=mapping_id, start=m.start, end=m.end, name=m.name,
                                  reason=reason or "")
        make_room(entry.ByteSize() + 8).removed.append(entry)
    for mapping_id, owed, parts in encoded:
        m = owed.meta
        for first_page, npages, form, body, count in parts:
            if not count and owed.status == "tracking":
                continue                           # nothing written there
            need = len(body) + PIECE_OVERHEAD + len(m.name.encode())
            piece = make_room(need).mappings.add(
                mapping_id=mapping_id, start=m.start, end=m.end, name=m.name, kind=m.kind,
                status=STATUS[owed.status], reason=owed.reason or "", first_page=first_page,
                npages=npages, dirty_pages=count, file_offset=m.offset, dev=m.dev,
                inode=m.inode)
            setattr(piece, form, body)
    chunks[-1].last_chunk = True
    return chunks


# -- the client side: decoding (used by the CLI, the tests and the bench) -----------

def piece_runs(piece: pb.MappingDirty) -> list[tuple[int, int]]:
    """(first, stop) page runs of a MappingDirty piece, relative to its mapping."""
    runs = []
    if piece.WhichOneof("pages") == "runs":
        body, pos, page = piece.runs, 0, piece.first_page
        while pos < len(body):
            gap, pos = _varint(body, pos)
            length, pos = _varint(body, pos)
            runs.append((page + gap, page + gap + length))
            page += gap + length
    elif piece.WhichOneof("pages") == "bitmap":
        # Decoded by the core (a DirtySet encoding around the same bytes).
        header = bytearray(b"DT\x01\x01\x00")
        _put_varint(header, len(piece.bitmap) * 8)
        for lo, hi in DirtySet.decode(bytes(header) + piece.bitmap).runs():
            runs.append((piece.first_page + lo, piece.first_page + hi))
    return runs


def chunk_pages(chunk: pb.DirtySetChunk) -> set[int]:
    """Every dirty page of a chunk as a virtual address (for small sets)."""
    out = set()
    for piece in chunk.mappings:
        for lo, hi in piece_runs(piece):
            out.update(range(piece.start + lo * chunk.page_size,
                             piece.start + hi * chunk.page_size, chunk.page_size))
    return out
