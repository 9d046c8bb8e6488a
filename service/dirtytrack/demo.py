"""`dirtytrack demo`: track a buffer while a writer dirties it, live.

A writer thread writes random pages (a hot set gets most writes, like real
programs) and logs each write; every interval the demo collects, prints the
dirty rate, and checks the report against the writer's log: the "missed"
column is the promise, and must stay 0.
"""
from __future__ import annotations

import ctypes
import random
import sys
import threading
import time

import dirtytrack
from dirtytrack.verify import WriteLog

_memset = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)(
    ("memset", ctypes.CDLL(None)))


def run(size: int, seconds: float, interval: float, rate: int, out=sys.stdout) -> int:
    import mmap
    page = dirtytrack.PAGE_SIZE
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    npages = size // page
    hot = max(1, npages // 20)          # 5% of pages take 80% of writes
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    log = WriteLog()
    stop = threading.Event()
    missed_total = 0

    def writer() -> None:
        rng = random.Random(1)
        batch = max(1, rate // 100)
        while not stop.is_set():
            started = time.monotonic()
            for _ in range(batch):
                p = rng.randrange(hot) if rng.random() < 0.8 else rng.randrange(npages)
                log.write(p, lambda: _memset(base + p * page, rng.randrange(256), 8))
            time.sleep(max(0.0, 0.01 - (time.monotonic() - started)))

    print(f"tracking {size >> 20} MiB ({npages} pages); writer aims at {rate} writes/s "
          f"for {seconds:g}s", file=out)
    print(f"{'time':>6} {'dirty':>8} {'pages/s':>9} {'MiB/s':>8} {'scan ms':>8} {'missed':>7}",
          file=out)
    try:
        with dirtytrack.track(buf) as tracker:
            thread = threading.Thread(target=writer, daemon=True)
            began = last = time.monotonic()
            thread.start()
            while True:
                now = time.monotonic()
                final = now - began >= seconds
                if final:
                    stop.set()
                    thread.join()
                scan_ms = [0.0]

                def collect():
                    t0 = time.perf_counter()
                    d = tracker.collect()
                    scan_ms[0] = (time.perf_counter() - t0) * 1e3
                    return d.pages()

                dirty = len(log.collect(collect))
                missed = log.check_settled()
                if final:
                    missed += log.missed()
                missed_total += len(missed)
                now = time.monotonic()
                span = max(now - last, 1e-9)
                last = now
                print(f"{now - began:5.1f}s {dirty:8d} {dirty / span:9.0f} "
                      f"{dirty * page / span / (1 << 20):8.1f} {scan_ms[0]:8.2f} {len(missed):7d}",
                      file=out, flush=True)
                if final:
                    break
                time.sleep(interval)
    finally:
        stop.set()
        del base
        buf.close()
    verdict = "every written page was reported" if not missed_total else "PAGES WERE MISSED"
    print(f"{log.collects_finished} collects, {log.checked} writes checked, "
          f"{missed_total} missed: {verdict}", file=out)
    return 0 if not missed_total else 1
