"""Daemon pieces without a server: stubs vs .proto, config precedence,
encoding round trips, cursor merge rules."""
from __future__ import annotations

import os
import random
import runpy

import pytest

from dirtytrack import DirtySet
from dirtytrack.daemon import config as config_mod
from dirtytrack.daemon.cursors import Cursor, SetState
from dirtytrack.daemon.encoding import encode_set, piece_runs, pieces
from dirtytrack.daemon.errors import BadRequest, Precondition
from dirtytrack.process import MappingReport, ProcessDirtySet
from dirtytrack.v1 import dirtytrack_pb2 as pb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_built_stubs_match_the_proto(tmp_path):
    """The one stub policy: generated at build time; a stale build fails here."""
    build = os.path.join(ROOT, "proto", "build_stubs.py")
    if not os.path.exists(build):
        pytest.skip("not running from a source checkout")
    runpy.run_path(build)["generate"](str(tmp_path))
    fresh = (tmp_path / "dirtytrack" / "v1" / "dirtytrack_pb2.py").read_text()
    built = open(pb.__file__).read()
    assert fresh == built, "service/dirtytrack/v1 is stale: rebuild (setup.py build_ext --inplace)"


def test_config_precedence(tmp_path):
    toml = tmp_path / "d.toml"
    toml.write_text('[daemon]\nsocket = "/file.sock"\ndefault_interval_ms = 500\n'
                    'default_window = 3\n')
    env = {"DIRTYTRACK_DEFAULT_INTERVAL_MS": "250", "DIRTYTRACK_SOCKET": "/env.sock"}
    cfg = config_mod.load({"socket": "/flag.sock"}, env=env, config_file=str(toml))
    assert (cfg.socket, cfg.default_interval_ms, cfg.default_window) == ("/flag.sock", 250, 3)
    cfg = config_mod.load({}, env={}, config_file=str(toml))
    assert cfg.socket == "/file.sock" and cfg.max_message_bytes == 1 << 20
    with pytest.raises(config_mod.ConfigError, match="TLS"):
        config_mod.load({"listen": "127.0.0.1:7000"}, env={}, config_file=str(toml))
    assert config_mod.load({"listen": "127.0.0.1:7000", "insecure_tcp": True}, env={},
                           config_file=str(toml)).insecure_tcp
    toml.write_text("colour = 1\n")
    with pytest.raises(config_mod.ConfigError, match="unknown key 'colour'"):
        config_mod.load({}, env={}, config_file=str(toml))
    with pytest.raises(config_mod.ConfigError, match="DIRTYTRACK_DEFAULT_WINDOW"):
        config_mod.load({}, env={"DIRTYTRACK_DEFAULT_WINDOW": "many"}, config_file="/dev/null")


@pytest.mark.parametrize("seed", range(40))
def test_pieces_round_trip_below_budget(seed):
    rng = random.Random(seed)
    n = rng.randrange(1, 200_000)
    d = DirtySet(n)
    for _ in range(rng.randrange(0, 3000)):
        a = rng.randrange(n)
        d.add_range(a, min(n, a + rng.randrange(1, 40)))
    budget = rng.choice([64, 512, 4096, 1 << 20])
    got = DirtySet(n)
    for first, npages, form, body, count in pieces(d, budget):
        assert len(body) <= budget + 20 and first + npages <= n
        piece = pb.MappingDirty(first_page=first, npages=npages)
        setattr(piece, form, body)
        runs = piece_runs(piece)
        assert sum(b - a for a, b in runs) == count
        for a, b in runs:
            assert first <= a < b <= first + npages
            got.add_range(a, b)
    assert got == d


def _report(mid, status, npages, pages=(), reason=None, exited=False, events=()):
    d = None if status == "removed" else DirtySet.from_pages(npages, pages)
    if status in ("new", "lost") and d is not None:
        d.add_range(0, npages)
    m = MappingReport(mid, 0x10000 * mid, 0x10000 * mid + npages * 4096, f"m{mid}", "anon", 0,
                      "00:00", 0, status, d, reason)
    return ProcessDirtySet(1, [m], exited=exited, events=list(events))


def test_cursor_rewind_is_gapless_and_owes_everything():
    c = Cursor("cur-x-1", target=None)
    c.pending.add_report(_report(1, "tracking", 64, [1]), 1, 1)
    s1, _ = c.deliver()
    c.pending.add_report(_report(1, "tracking", 64, [2]), 2, 2)
    s2, _ = c.deliver()
    c.pending.add_report(_report(1, "tracking", 64, [3]), 3, 3)
    c.rewind(1)                                   # set 2 was lost: owe it again as 2
    seq, state = c.deliver()
    assert (s1, s2, seq) == (1, 2, 2)
    assert state.mappings[1].dirty.pages() == [2, 3] and state.scans == 2
    with pytest.raises(Precondition):
        c.rewind(0)
    with pytest.raises(BadRequest):
        c.rewind(5)


def test_removed_after_dirty_drops_the_pages_and_lost_wins():
    s = SetState()
    s.add_report(_report(1, "tracking", 8, [1]), 1, 1)
    later = SetState()
    later.add_report(_report(1, "removed", 8), 2, 2)
    later.add_report(_report(2, "lost", 8, reason="moved", events=[("lost", "m2: moved")]), 3, 3)
    s.absorb(later)
    assert 1 not in s.mappings and 1 in s.removed
    assert s.mappings[2].status == "lost" and s.mappings[2].dirty.count == 8
    assert s.full_resync


def test_shared_scan_sets_are_copied_before_merging():
    r1 = _report(1, "tracking", 64, [1])
    a, b = SetState(), SetState()
    a.add_report(r1, 1, 1)
    b.add_report(r1, 1, 1)
    assert a.mappings[1].dirty is b.mappings[1].dirty          # shared, no copy yet
    a.add_report(_report(1, "tracking", 64, [9]), 2, 2)
    assert b.mappings[1].dirty.pages() == [1] and a.mappings[1].dirty.pages() == [1, 9]


def test_encode_set_splits_big_sets_into_chunks():
    s = SetState()
    rng = random.Random(1)
    sparse = DirtySet.from_pages(1 << 22, rng.sample(range(1 << 22), 300_000))
    m = _report(1, "tracking", 1 << 22).mappings[0]
    from dirtytrack.daemon.cursors import Owed
    s.mappings[1] = Owed(m, "tracking", sparse, None)
    s.scans = 1
    chunks = encode_set(s, cursor_id="c", target_id="t", seq=7, max_bytes=256 << 10)
    assert len(chunks) > 1 and chunks[-1].last_chunk
    assert all(ch.ByteSize() <= 256 << 10 for ch in chunks)
    assert [ch.chunk_index for ch in chunks] == list(range(len(chunks)))
    got = DirtySet(1 << 22)
    for ch in chunks:
        for piece in ch.mappings:
            for a, b in piece_runs(piece):
                got.add_range(a, b)
    assert got == sparse


def test_removed_mappings_and_reasons_count_against_the_chunk_limit():
    """30,000 removed mappings plus a big bitmap: every chunk stays under the
    limit, and the client gets every removed entry back."""
    from dirtytrack.daemon.client import join_chunks
    from dirtytrack.daemon.cursors import Owed, SetState
    from dirtytrack.daemon.encoding import encode_set
    st = SetState()
    for mid in range(1, 30001):
        m = MappingReport(mid, mid << 24, (mid << 24) + 4096, "/memfd:" + "g" * 100, "shmem", 0,
                          "00:0e", 0, "removed", None)
        st.removed[mid] = (m, "no longer wholly mapped")
    d = DirtySet(1 << 24)
    d.add_range(0, 1 << 20)
    m = MappingReport(99999, 1 << 50, (1 << 50) + (1 << 36), "big", "anon", 0, "", 0,
                      "tracking", d)
    st.mappings[99999] = Owed(m, "tracking", d, None)
    limit = 1 << 20
    chunks = encode_set(st, cursor_id="c", target_id="t", seq=1, max_bytes=limit)
    assert len(chunks) > 1 and all(c.ByteSize() <= limit for c in chunks)
    view = join_chunks(chunks)
    assert len(view.removed) == 30000
    assert sum(hi - lo for lo, hi in view.ranges()) == (1 << 20) * 4096
