#!/usr/bin/env python3
"""Benchmark of the daemon: Collect over gRPC against the raw C scan, and fan-out.

Not a test: CI does not run it. See bench/README.md ("Daemon").

    PYTHONPATH=service /tmp/venv/bin/python bench/daemon_bench.py [--size 16G] [--rounds 9]
        [--fan-size 1G] [--cursors 1,10,100] [--json bench/out/daemon.json]

1. Collect vs raw. This process maps --size of private anonymous memory
   (4 KiB pages), writes every page once, and has a `dirtytrack serve`
   subprocess attach it over a Unix socket (selection: exactly that range).
   Each round writes 1 % of the pages (every 100th) and times, alternately:
     grpc  one Collect over gRPC, from the request to the last chunk decoded
           into a DirtySetView (scan + cursor merge + encoding + transport)
     raw   bench/raw_scan.c's PAGEMAP_SCAN loop on the same range, same
           get-and-reset, timed inside C (its reset takes those pages from
           the daemon, which is why each timed call gets its own writes)
   Both page counts are checked against the pattern.
2. Fan-out. --fan-size tracked, 1 % written per round, N cursors each
   Collect concurrently (one shared scan); time per round and per cursor.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
PAGE = 4096

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def build_raw():
    out = os.path.join(HERE, "out")
    os.makedirs(out, exist_ok=True)
    lib = os.path.join(out, "raw_scan.so")
    subprocess.run([os.environ.get("CC", "cc"), "-O2", "-Wall", "-Werror", "-shared", "-fPIC",
                    "-o", lib, os.path.join(HERE, "raw_scan.c")], check=True)
    dll = ctypes.CDLL(lib)
    u64, u64p, vp = ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p
    dll.raw_scan_timed.restype = ctypes.c_long
    dll.raw_scan_timed.argtypes = [ctypes.c_int, u64, u64, vp, u64, u64p, u64p, ctypes.c_int]
    dll.touch_pages.restype = u64
    dll.touch_pages.argtypes = [vp, u64, u64, u64]
    return dll


def parse_size(text):
    from dirtytrack.cli import parse_size as p
    return p(text)


def mapping(size, raw):
    addr = libc.mmap(None, size, 3, 0x02 | 0x20 | 0x4000, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    libc.madvise(addr, size, 15)                   # MADV_NOHUGEPAGE: 4 KiB pages
    t0 = time.monotonic()
    raw.touch_pages(addr, size // PAGE, 0, 1)      # populated, like a live program's state
    log(f"populated {size >> 30} GiB in {time.monotonic() - t0:.1f} s")
    return addr


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def collect_vs_raw(client, raw, size, rounds):
    from dirtytrack.daemon.client import Client  # noqa: F401
    addr = mapping(size, raw)
    npages = size // PAGE
    tid = client.attach(os.getpid(), no_default=True, ranges=[(addr, addr + size)],
                        timeout=120).target.target_id
    cursor = client.open_cursor(tid)
    client.collect(cursor)                         # baseline: everything reset
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    vec = (ctypes.c_uint64 * (3 * 1024))()
    grpc_ms, raw_ms, bad = [], [], 0
    for r in range(rounds):
        first = r % 100
        want = len(range(first, npages, 100))
        for which in (("grpc", "raw") if r % 2 else ("raw", "grpc")):
            raw.touch_pages(addr, npages, first, 100)
            if which == "grpc":
                t0 = time.perf_counter()
                s = client.collect(cursor)
                grpc_ms.append((time.perf_counter() - t0) * 1e3)
                client.ack(cursor, s.seq)
                got = s.count
            else:
                pages, ns = ctypes.c_uint64(), ctypes.c_uint64()
                rc = raw.raw_scan_timed(fd, addr, addr + size, vec, 1024, ctypes.byref(pages),
                                        ctypes.byref(ns), 0)
                assert rc > 0, rc
                raw_ms.append(ns.value / 1e6)
                got = pages.value
            if got != want:
                bad += 1
                log(f"!!! {which} round {r}: {got} pages, expected {want}")
    os.close(fd)
    info = client.describe(tid)
    client.stub.Detach(__import__("dirtytrack.v1.dirtytrack_pb2", fromlist=["x"])
                       .DetachRequest(target_id=tid))
    libc.munmap(addr, size)
    return dict(size=size, rounds=rounds, grpc_ms=grpc_ms, raw_ms=raw_ms,
                grpc_median_ms=med(grpc_ms), raw_median_ms=med(raw_ms),
                ratio=med(grpc_ms) / med(raw_ms), last_scan_us=info.last_scan_us,
                mismatches=bad)


def fan_out(address, client, raw, size, counts, rounds):
    import grpc
    from dirtytrack.daemon.client import join_chunks
    from dirtytrack.v1 import dirtytrack_pb2 as pb
    from dirtytrack.v1 import dirtytrack_pb2_grpc as pb_grpc
    addr = mapping(size, raw)
    npages = size // PAGE
    tid = client.attach(os.getpid(), no_default=True, ranges=[(addr, addr + size)],
                        timeout=120).target.target_id
    results = []
    for n in counts:
        cursors = [client.open_cursor(tid) for _ in range(n)]

        async def run():
            async with grpc.aio.insecure_channel(address) as ch:
                stub = pb_grpc.DirtyTrackerStub(ch)
                after = {c: 0 for c in cursors}

                async def one(c):
                    s = join_chunks([x.chunk async for x in stub.Collect(
                        pb.CollectRequest(cursor_id=c, after_seq=after[c]))])
                    after[c] = s.seq
                    return s.count

                await asyncio.gather(*(one(c) for c in cursors))       # baseline
                times = []
                for r in range(rounds):
                    raw.touch_pages(addr, npages, r % 100, 100)
                    t0 = time.perf_counter()
                    counts_ = await asyncio.gather(*(one(c) for c in cursors))
                    times.append((time.perf_counter() - t0) * 1e3)
                    want = len(range(r % 100, npages, 100))
                    assert all(x == want for x in counts_), (counts_[:3], want)
                return times

        times = asyncio.run(run())
        info = client.describe(tid)
        held = sum(c.held_bytes for c in info.cursors)
        results.append(dict(cursors=n, round_ms=med(times), per_cursor_ms=med(times) / n,
                            held_bytes=held))
        log(f"fan-out {n:>3} cursors: {med(times):8.2f} ms a round, "
            f"{med(times) / n:7.3f} ms a cursor")
        for c in cursors:
            client.stub.CloseCursor(pb.CloseCursorRequest(cursor_id=c))
    client.stub.Detach(pb.DetachRequest(target_id=tid))
    libc.munmap(addr, size)
    return dict(size=size, rounds=rounds, runs=results)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="16G")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--fan-size", default="1G")
    ap.add_argument("--cursors", default="1,10,100")
    ap.add_argument("--json", default=os.path.join(HERE, "out", "daemon.json"))
    args = ap.parse_args()
    from daemon_support import Daemon
    from dirtytrack.daemon.client import Client
    raw = build_raw()
    size = parse_size(args.size)
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    if avail < size + (2 << 30):
        log(f"only {avail >> 30} GiB available: --size {args.size} needs {(size >> 30) + 2}")
        return 2
    d = Daemon("--interval-ms", "60000")             # no background scans: Collect only
    out = {}
    try:
        with Client(d.address) as client:
            out["collect"] = cvr = collect_vs_raw(client, raw, size, args.rounds)
            print(f"Collect over gRPC, {size >> 30} GiB tracked, 1 % written "
                  f"({size // PAGE // 100} pages): grpc {cvr['grpc_median_ms']:.2f} ms, "
                  f"raw C scan {cvr['raw_median_ms']:.2f} ms, ratio {cvr['ratio']:.2f} "
                  f"(medians of {args.rounds}; mismatches {cvr['mismatches']})")
            out["fanout"] = fo = fan_out(d.address, client, raw, parse_size(args.fan_size),
                                         [int(x) for x in args.cursors.split(",")], args.rounds)
            for r in fo["runs"]:
                print(f"fan-out {fo['size'] >> 20} MiB, 1 %: {r['cursors']:>3} cursors "
                      f"{r['round_ms']:8.2f} ms a round, {r['per_cursor_ms']:7.3f} ms a cursor, "
                      f"{r['held_bytes'] >> 10} KiB held")
    finally:
        d.close()
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
