"""The bundled demo workload: a process that writes random pages of a buffer.

    python -m dirtytrack.workload --size 256M --rate 20000

Prints "ready PID ADDRESS SIZE", starts writing on "go" (stdin), and on
"stop" stops, then prints every page it wrote as "pages FIRST-STOP ..."
ranges (relative to ADDRESS) so the demo can check the daemon's report.
A hot 5% of the pages takes 80% of the writes, like real programs.
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import random
import sys
import threading
import time

_memset = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)(
    ("memset", ctypes.CDLL(None)))


def main(argv=None) -> int:
    from dirtytrack.cli import parse_size
    p = argparse.ArgumentParser(prog="python -m dirtytrack.workload")
    p.add_argument("--size", default="256M")
    p.add_argument("--rate", type=int, default=20000, help="writes per second")
    args = p.parse_args(argv)
    size = parse_size(args.size)
    page = mmap.PAGESIZE
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    npages = size // page
    hot = max(1, npages // 20)
    written = bytearray(npages)
    stop = threading.Event()

    def writer():
        rng = random.Random(1)
        batch = max(1, args.rate // 100)
        while not stop.is_set():
            began = time.monotonic()
            for _ in range(batch):
                n = rng.randrange(hot) if rng.random() < 0.8 else rng.randrange(npages)
                written[n] = 1                # logged before the write: never under-logged
                _memset(base + n * page, rng.randrange(256), 8)
            time.sleep(max(0.0, 0.01 - (time.monotonic() - began)))

    print(f"ready {os.getpid()} {base} {size}", flush=True)
    thread = threading.Thread(target=writer, daemon=True)
    for line in sys.stdin:
        if line.startswith("go"):
            thread.start()
        elif line.startswith("stop"):
            stop.set()
            if thread.is_alive():
                thread.join()
            runs, i = [], 0
            while i < npages:
                if written[i]:
                    j = i
                    while j < npages and written[j]:
                        j += 1
                    runs.append(f"{i}-{j}")
                    i = j
                else:
                    i += 1
            print("pages " + " ".join(runs), flush=True)
        elif line.startswith("exit"):
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
