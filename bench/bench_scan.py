#!/usr/bin/env python3
"""Benchmark of dirtytrack's scan path against a bare C loop around PAGEMAP_SCAN.

Not a test: CI does not run it. See bench/README.md.

    cd /work/main && PYTHONPATH=service /tmp/venv/bin/python bench/bench_scan.py \
        [--sizes 1G,16G] [--patterns 0,1,100] [--rounds N] [--json bench/out/scan.json]

One process, one mapping, one userfaultfd registration per size. Each round
writes the pattern and times ONE scanner (the others each get their own write
of the same pattern), rotating the order every round so that the machine's
noise falls on all of them alike:

  raw      bench/raw_scan.c raw_scan(): the ioctl loop alone, timed inside C
  scan     Tracker.scan(region)    -> RunList   (kernel scan + run list)
  collect  Tracker.collect(region) -> DirtySet  (scan + bitmap)

All three do get-and-reset on the same registered range through the tracker's
own /proc/self/pagemap fd, so each one sees exactly the pages the write before
it touched; the page counts are checked against each other and the pattern.
Only the scan is timed, never the writes.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")
PAGE = 4096
GiB = 1 << 30
# dirtytrack's SCAN_VEC_LEN (ext/dirtytrack/tracker.pxi): page_region entries
# per ioctl. The raw loop uses the same so both make the same kernel calls.
VEC_LEN = 1024

PROT_READ, PROT_WRITE = 1, 2
MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE = 0x02, 0x20, 0x4000
MADV_NOHUGEPAGE = 15

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fail(msg: str) -> None:
    """A loud, unmistakable error (the benchmark still finishes its run)."""
    bar = "!" * 78
    print(f"\n{bar}\n!!! ERROR: {msg}\n{bar}\n", file=sys.stderr, flush=True)


# -- the pieces ---------------------------------------------------------------

def import_core():
    """dirtytrack._core; while the lead rebuilds it the import fails briefly."""
    for attempt in range(6):
        try:
            from dirtytrack import _core
            return _core
        except ImportError as exc:
            if attempt == 5:
                raise
            log(f"importing dirtytrack failed ({exc}); retrying in 30 s (a rebuild?)")
            time.sleep(30)


def build_raw() -> ctypes.CDLL:
    os.makedirs(OUT, exist_ok=True)
    src = os.path.join(HERE, "raw_scan.c")
    lib = os.path.join(OUT, "raw_scan.so")
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-o", lib, src], check=True)
    dll = ctypes.CDLL(lib)
    u64, u64p, vp = ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p
    dll.raw_scan.restype = ctypes.c_long
    dll.raw_scan.argtypes = [ctypes.c_int, u64, u64, vp, u64, u64p]
    dll.raw_scan_timed.restype = ctypes.c_long
    dll.raw_scan_timed.argtypes = [ctypes.c_int, u64, u64, vp, u64, u64p, u64p, ctypes.c_int]
    dll.touch_pages.restype = u64
    dll.touch_pages.argtypes = [vp, u64, u64, u64]
    dll.touch_list.restype = u64
    dll.touch_list.argtypes = [vp, vp, u64]
    dll.monotonic_ns.restype = u64
    dll.monotonic_ns.argtypes = []
    return dll


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if text and text[-1] in mult:
        return int(float(text[:-1]) * mult[text[-1]])
    return int(text)


def fmt_size(n: int) -> str:
    return f"{n / GiB:g}G" if n >= GiB else f"{n >> 20}M"


class Pattern:
    """Which pages a round writes. '0', '1', '100' (percent: '1' is every
    100th page), 'rand1' (a fixed random 1% of the pages, seed 1)."""

    def __init__(self, name: str, npages: int):
        self.name = name
        self.npages = npages
        self.list = None
        if name == "0":
            self.stride, self.expected = 0, 0
        elif name == "100":
            self.stride, self.expected = 1, npages
        elif name == "1":
            self.stride = 100
            self.expected = (npages + 99) // 100
        elif name == "rand1":
            k = max(1, npages // 100)
            pages = sorted(random.Random(1).sample(range(npages), k))
            self.list = (ctypes.c_uint64 * k)(*pages)
            self.expected = k
        else:
            raise ValueError(f"unknown pattern {name!r} (0, 1, 100, rand1)")

    @property
    def label(self) -> str:
        return {"0": "0%", "1": "1%", "100": "100%", "rand1": "1% rnd"}[self.name]

    def write(self, raw, base: int, progress: bool = False) -> int:
        if self.list is not None:
            return raw.touch_list(base, ctypes.addressof(self.list), len(self.list))
        if not self.stride:
            return 0
        # In 1 GiB chunks, so a long first population can show progress.
        chunk = GiB // PAGE
        done = 0
        for first in range(0, self.npages, chunk):
            n = min(chunk, self.npages - first)
            # keep the global stride phase: pages first + k*stride - (first % stride)
            phase = (-first) % self.stride
            done += raw.touch_pages(base + first * PAGE, n, phase, self.stride)
            if progress:
                log(f"    written {fmt_size((first + n) * PAGE)} of {fmt_size(self.npages * PAGE)}")
        return done


# -- one size -----------------------------------------------------------------

def default_rounds(size: int, pattern: str) -> int:
    # Cheap cases get many rounds (the machine is noisy); writing every page
    # of a large size costs seconds per round (one async write fault a page).
    return 7 if pattern == "100" and size > GiB else 15


def bench_size(core, raw, size: int, patterns: list[str], rounds: int | None, vec_len: int,
               prefault: bool, trust_walk_end: bool = False) -> dict:
    npages = size // PAGE
    base = libc.mmap(None, size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if base in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    result = {"size": size, "npages": npages, "vec_len": vec_len,
              "prefault": prefault, "trust_walk_end": trust_walk_end, "cases": []}
    tracker = None
    try:
        if libc.madvise(base, size, MADV_NOHUGEPAGE):
            raise OSError(ctypes.get_errno(), "madvise(MADV_NOHUGEPAGE)")
        tracker = core.Tracker()
        t0 = time.perf_counter()
        region = tracker.add_range(base, size)
        result["add_range_ms"] = (time.perf_counter() - t0) * 1e3
        log(f"  add_range({fmt_size(size)}): {result['add_range_ms']:.1f} ms")
        fd = tracker.pagemap_fileno()
        vec = ctypes.create_string_buffer(vec_len * 24)
        pages = ctypes.c_uint64()
        ns = ctypes.c_uint64()
        start, end = base, base + size

        def run_raw():
            t0 = time.perf_counter_ns()
            rc = raw.raw_scan_timed(fd, start, end, vec, vec_len, ctypes.byref(pages),
                                    ctypes.byref(ns), trust_walk_end)
            outer = time.perf_counter_ns() - t0
            if rc < 0:
                raise OSError(-rc, f"raw_scan: {os.strerror(-rc)}")
            return ns.value, pages.value, {"ctypes_ns": outer, "ioctls": rc}

        def run_scan():
            t0 = time.perf_counter_ns()
            runs = region_scan(region)
            elapsed = time.perf_counter_ns() - t0
            if runs.lost:
                raise RuntimeError(f"scan lost tracking: {runs.lost_reason}")
            return elapsed, runs.count, {"runs": len(runs)}

        def run_collect():
            t0 = time.perf_counter_ns()
            dset = region_collect(region)
            elapsed = time.perf_counter_ns() - t0
            if dset.lost:
                raise RuntimeError(f"collect lost tracking: {dset.lost_reason}")
            return elapsed, dset.count, {}

        region_scan, region_collect = tracker.scan, tracker.collect
        scanners = {"raw": run_raw, "scan": run_scan, "collect": run_collect}

        if prefault:
            # Populate every page once, then reset: all patterns then scan the
            # same populated, write-protected memory (a live program's state).
            log(f"  populating {fmt_size(size)} (every page once)...")
            t0 = time.perf_counter()
            Pattern("100", npages).write(raw, base, progress=size > 2 * GiB)
            log(f"  populated in {time.perf_counter() - t0:.1f} s; first scan...")
            _, got, _ = run_raw()
            if got != npages:
                fail(f"{fmt_size(size)} populate: raw scan found {got} pages, wrote {npages}")
            _, got, _ = run_raw()
            if got:
                fail(f"{fmt_size(size)}: a scan right after a reset found {got} pages")

        for pname in patterns:
            pat = Pattern(pname, npages)
            nrounds = rounds or default_rounds(size, pname)
            label = f"{fmt_size(size)} {pat.label}"
            log(f"  {label}: {nrounds} rounds x 3 scanners "
                f"({pat.expected} pages written per scan)")
            # one untimed warm-up pass of each scanner
            for name, fn in scanners.items():
                pat.write(raw, base)
                fn()
            times = {name: [] for name in scanners}
            extra = {name: [] for name in scanners}
            mismatches = []
            order = list(scanners)
            t_case = time.perf_counter()
            for rnd in range(nrounds):
                k = rnd % len(order)
                counts = {}
                for name in order[k:] + order[:k]:
                    written = pat.write(raw, base)
                    gc.disable()
                    try:
                        ru0 = resource.getrusage(resource.RUSAGE_SELF)
                        elapsed, count, info = scanners[name]()
                        ru1 = resource.getrusage(resource.RUSAGE_SELF)
                    finally:
                        gc.enable()
                    # page faults taken inside the call (the scanner's own
                    # buffers), and whether the scheduler preempted it
                    info["minflt"] = ru1.ru_minflt - ru0.ru_minflt
                    info["nivcsw"] = ru1.ru_nivcsw - ru0.ru_nivcsw
                    times[name].append(elapsed)
                    extra[name].append(info)
                    counts[name] = count
                    if count != written:
                        mismatches.append((rnd, name, count, written))
                if len(set(counts.values())) != 1:
                    fail(f"{label} round {rnd}: scanners disagree on the page count: {counts}")
                if size > 2 * GiB and pat.expected > npages // 10:
                    log(f"    round {rnd + 1}/{nrounds} done "
                        f"({time.perf_counter() - t_case:.0f} s)")
            for rnd, name, count, written in mismatches:
                fail(f"{label} round {rnd}: {name} reported {count} pages, "
                     f"the pattern wrote {written}")
            case = {"pattern": pname, "label": pat.label, "written": pat.expected,
                    "rounds": nrounds, "mismatches": len(mismatches)}
            case.update(summarize(times, extra, npages))
            med = case["median_ns"]
            result["cases"].append(case)
            log(f"    raw {med['raw'] / 1e6:.3f} ms  scan {med['scan'] / 1e6:.3f} ms "
                f"({case['ratio']['scan']:.3f}x)  collect {med['collect'] / 1e6:.3f} ms "
                f"({case['ratio']['collect']:.3f}x)")
    finally:
        if tracker is not None:
            tracker.close()
        libc.munmap(base, size)
    return result


# -- statistics ---------------------------------------------------------------

def summarize(times: dict, extra: dict, npages: int) -> dict:
    """Medians and ratios of one case.

    The headline medians are over the calls the scheduler did not preempt
    (getrusage ru_nivcsw unchanged across the call): on this 2-vCPU shared
    machine a preemption adds a whole 4 ms tick to a 2.7 ms scan, and when it
    hits half the samples it moves a plain median by that much. A scanner with
    fewer than 3 such calls falls back to all of them. Medians over every call
    are kept as well ("median_all_ns").
    """
    clean, kept = {}, {}
    for n, v in times.items():
        unpreempted = [t for t, e in zip(v, extra[n]) if e["nivcsw"] == 0]
        kept[n] = len(unpreempted)
        clean[n] = unpreempted if len(unpreempted) >= 3 else list(v)
    med = {n: statistics.median(v) for n, v in clean.items()}
    med_all = {n: statistics.median(v) for n, v in times.items()}
    raw_outer = [e["ctypes_ns"] for e in extra["raw"]]
    raw_outer_clean = [e["ctypes_ns"] for e in extra["raw"] if e["nivcsw"] == 0]
    if len(raw_outer_clean) < 3:
        raw_outer_clean = raw_outer
    raw_py = statistics.median(raw_outer_clean)
    dt = ("scan", "collect")
    return {
        "times_ns": times,
        "extra": extra,
        "kept": kept,               # calls not preempted
        "fallback": [n for n in times if kept[n] < 3],   # medians over all calls
        "median_ns": med,
        "median_all_ns": med_all,
        "min_ns": {n: min(v) for n, v in times.items()},
        "max_ns": {n: max(v) for n, v in times.items()},
        "ratio": {n: med[n] / med["raw"] for n in dt},
        "ratio_all": {n: med_all[n] / med_all["raw"] for n in dt},
        "ratio_of_min": {n: min(times[n]) / min(times["raw"]) for n in dt},
        # per-round pairing: same round, same machine state
        "ratio_median_of_rounds": {
            n: statistics.median(a / b for a, b in zip(times[n], times["raw"])) for n in dt},
        "ns_per_page": {n: med[n] / npages for n in times},
        "raw_ctypes_median_ns": raw_py,
        "ratio_vs_ctypes": {n: med[n] / raw_py for n in dt},
        "raw_ioctls": extra["raw"][0]["ioctls"],
        "runs": extra["scan"][0]["runs"],
        "minflt_median": {n: statistics.median(e["minflt"] for e in extra[n]) for n in times},
    }


# -- report -------------------------------------------------------------------

def print_table(results: list[dict], goal: float) -> None:
    hdr = (f"{'size':>5} {'written':>7} {'raw C ms':>9} {'scan ms':>9} {'collect ms':>10} "
           f"{'scan/raw':>8} {'coll/raw':>8} {'raw ns/pg':>9} {'ioctls':>6} {'runs':>7} "
           f"{'rawPy ms':>9} {'scan/rawPy':>10}")
    print(hdr)
    print("-" * len(hdr))
    worst = 0.0
    noisy = False
    for res in results:
        for c in res["cases"]:
            m, r = c["median_ns"], c["ratio"]
            worst = max(worst, r["scan"], r["collect"])
            flag = lambda x: "*" if x > goal else " "  # noqa: E731
            mark = "~" if min(c["kept"].values()) < c["rounds"] / 2 else " "
            noisy = noisy or mark == "~"
            print(f"{fmt_size(res['size']):>5}{mark}{c['label']:>7} {m['raw'] / 1e6:9.3f} "
                  f"{m['scan'] / 1e6:9.3f} {m['collect'] / 1e6:10.3f} "
                  f"{r['scan']:7.3f}{flag(r['scan'])} {r['collect']:7.3f}{flag(r['collect'])} "
                  f"{c['ns_per_page']['raw']:9.2f} {c['raw_ioctls']:6d} {c['runs']:7d} "
                  f"{c['raw_ctypes_median_ns'] / 1e6:9.3f} {c['ratio_vs_ctypes']['scan']:10.3f}")
    print()
    print("spread and cross-checks (ms):")
    for res in results:
        for c in res["cases"]:
            lo, hi, ma = c["min_ns"], c["max_ns"], c["median_all_ns"]
            k, f = c["kept"], c["minflt_median"]
            print(f"{fmt_size(res['size']):>5} {c['label']:>7}  min..max  " + "  ".join(
                f"{n} {lo[n] / 1e6:.3f}..{hi[n] / 1e6:.3f}" for n in ("raw", "scan", "collect")))
            print(f"{'':14}all calls: medians " + " ".join(
                f"{ma[n] / 1e6:.3f}" for n in ("raw", "scan", "collect")) +
                f", ratios {c['ratio_all']['scan']:.3f}/{c['ratio_all']['collect']:.3f}; "
                f"paired-round ratios {c['ratio_median_of_rounds']['scan']:.3f}/"
                f"{c['ratio_median_of_rounds']['collect']:.3f}; ratio of minimums "
                f"{c['ratio_of_min']['scan']:.3f}/{c['ratio_of_min']['collect']:.3f}")
            fb = (f" (under 3 for {', '.join(c['fallback'])}: medians over all calls)"
                  if c["fallback"] else "")
            print(f"{'':14}unpreempted calls {k['raw']}/{k['scan']}/{k['collect']} "
                  f"of {c['rounds']}{fb}; page faults per call {f['raw']:g}/{f['scan']:g}/"
                  f"{f['collect']:g}  (raw/scan/collect)")
    print()
    print("Medians over the calls not preempted by the scheduler. raw C = raw_scan() timed inside C")
    print("(clock_gettime around the ioctl loop); rawPy = the same call timed from Python around")
    print("ctypes, the boundary scan()/collect() are timed at. ratios are dirtytrack / raw C.")
    print()
    if noisy:
        print("~ fewer than half of some scanner's calls ran unpreempted: that row's medians are")
        print("  noise-dominated; trust its paired-round ratios and ratio of minimums instead.")
        print()
    verdict = "met" if worst <= goal else "NOT met"
    print(f"goal: dirtytrack within {goal:.2f}x of raw C -> {verdict} "
          f"(worst median ratio {worst:.3f}x; * marks cases over the goal)")


def machine_info() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"kernel": platform.release(), "machine": platform.machine(), "cpu": cpu,
            "ncpu": os.cpu_count(), "python": platform.python_version(),
            "mem_available": mem_available()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1G,16G", help="tracked sizes, comma separated (1G,16G)")
    ap.add_argument("--patterns", default="0,1,100",
                    help="percent of pages written between scans: 0, 1, 100, rand1 (0,1,100)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="timed rounds per scanner and case (default 15; 7 for 100%% above 1 GiB)")
    ap.add_argument("--vec-len", type=int, default=VEC_LEN,
                    help=f"page_region entries per ioctl for the raw loop ({VEC_LEN}, as dirtytrack)")
    ap.add_argument("--trust-walk-end", action="store_true",
                    help="raw loop resumes from walk_end only (dirtytrack's loop before 24634e7), "
                         "to measure the kernel's stale-walk_end re-walk")
    ap.add_argument("--no-prefault", dest="prefault", action="store_false",
                    help="do not populate the memory first (0%%/1%% then scan unpopulated memory)")
    ap.add_argument("--headroom", default="2G",
                    help="MemAvailable needed beyond the size, else the size is skipped (2G)")
    ap.add_argument("--goal", type=float, default=1.10, help="ratio to report against (1.10)")
    ap.add_argument("--nice", type=int, default=0,
                    help="setpriority() of this process, e.g. -20 as root, to be preempted less (0)")
    ap.add_argument("--json", default=os.path.join(OUT, "scan.json"), help="JSON output path")
    args = ap.parse_args(argv)

    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    patterns = [p.strip().rstrip("%") for p in args.patterns.split(",") if p.strip()]
    for s in sizes:
        if s <= 0 or s % PAGE:
            ap.error(f"size {s} is not a positive multiple of {PAGE}")
    for p in patterns:
        Pattern(p, 100)  # validates the name
    if os.sysconf("SC_PAGESIZE") != PAGE:
        ap.error("this benchmark assumes 4 KiB pages")

    if args.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)
        except OSError as exc:
            log(f"cannot set nice {args.nice}: {exc}; going on without")
    core = import_core()
    raw = build_raw()
    headroom = parse_size(args.headroom)
    results, skipped = [], []
    for size in sizes:
        need = size + headroom if (args.prefault or "100" in patterns) else headroom
        avail = mem_available()
        if avail < need:
            msg = (f"skipping {fmt_size(size)}: MemAvailable is {avail / GiB:.1f} GiB, "
                   f"{need / GiB:.1f} GiB needed")
            log(msg)
            skipped.append({"size": size, "reason": msg})
            continue
        log(f"{fmt_size(size)} ({size // PAGE} pages)")
        results.append(bench_size(core, raw, size, patterns, args.rounds, args.vec_len,
                                  args.prefault, args.trust_walk_end))
        gc.collect()

    if results:
        print_table(results, args.goal)
    for s in skipped:
        print(s["reason"])
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
                   "args": vars(args), "results": results, "skipped": skipped}, f, indent=1)
    log(f"wrote {args.json}")
    return 1 if any(c["mismatches"] for r in results for c in r["cases"]) else 0


if __name__ == "__main__":
    sys.exit(main())
