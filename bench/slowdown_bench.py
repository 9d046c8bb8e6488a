"""How much a tracked program slows down: untracked vs dirtytrack (attached
from outside, collecting every interval) vs an in-process mprotect+SIGSEGV
tracker re-arming at the same interval. Same binary, same run, modes
interleaved; medians of writes/second and their ratios.

    python3 bench/slowdown_bench.py [--mib 64] [--seconds 2] [--interval-ms 100] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")


def build() -> str:
    os.makedirs(OUT, exist_ok=True)
    binary = os.path.join(OUT, "slowdown")
    subprocess.run(["cc", "-O2", "-Wall", "-pthread", "-o", binary,
                    os.path.join(HERE, "slowdown.c")], check=True)
    return binary


def run_once(binary: str, mode: str, args) -> dict:
    program_mode = "mprotect" if mode == "mprotect" else "plain"
    proc = subprocess.Popen([binary, program_mode, str(args.mib), str(args.seconds),
                             str(args.interval_ms), str(args.stride)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline().split()[1])
    collects, pages = [], 0
    stop = threading.Event()
    tracker = None
    if mode == "dirtytrack":
        import dirtytrack
        tracker = dirtytrack.attach(pid)

        def collector():
            nonlocal pages
            while not stop.wait(args.interval_ms / 1000):
                t0 = time.perf_counter()
                report = tracker.collect()
                collects.append(time.perf_counter() - t0)
                pages += report.count
        thread = threading.Thread(target=collector)
        thread.start()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    fields = proc.stdout.readline().split()
    proc.wait()
    if tracker is not None:
        stop.set()
        thread.join()
        tracker.close()
    result = {"writes_per_s": int(fields[1]) / float(fields[3]), "faults": int(fields[5])}
    if collects:
        result["collect_ms_median"] = statistics.median(collects) * 1e3
        result["pages_reported"] = pages
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--interval-ms", type=int, default=100)
    parser.add_argument("--stride", type=int, default=1, help="pages between consecutive writes")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    binary = build()
    modes = ["untracked", "dirtytrack", "mprotect"]
    results = {m: [] for m in modes}
    for round_no in range(args.rounds):
        order = modes[:]
        random.shuffle(order)
        for mode in order:
            print(f"round {round_no + 1}/{args.rounds}: {mode}", file=sys.stderr, flush=True)
            results[mode].append(run_once(binary, mode, args))
    base = statistics.median(r["writes_per_s"] for r in results["untracked"])
    summary = {}
    print(f"\n{args.mib} MiB, every page written each {args.interval_ms} ms cycle window, "
          f"{args.rounds} rounds of {args.seconds:g}s (medians)")
    print(f"{'mode':>11} {'Mwrites/s':>10} {'vs untracked':>13} {'spread':>15}")
    for mode in modes:
        rates = [r["writes_per_s"] for r in results[mode]]
        med = statistics.median(rates)
        summary[mode] = {"writes_per_s": med, "ratio_to_untracked": med / base,
                         "min": min(rates), "max": max(rates)}
        print(f"{mode:>11} {med / 1e6:10.1f} {med / base:12.2f}x "
              f"{min(rates) / 1e6:7.1f}-{max(rates) / 1e6:.1f}")
    collect_ms = [r["collect_ms_median"] for r in results["dirtytrack"] if "collect_ms_median" in r]
    if collect_ms:
        summary["dirtytrack"]["collect_ms_median"] = statistics.median(collect_ms)
        print(f"dirtytrack collect: median {statistics.median(collect_ms):.2f} ms")
    print(f"dirtytrack vs mprotect+SIGSEGV: "
          f"{summary['dirtytrack']['writes_per_s'] / summary['mprotect']['writes_per_s']:.2f}x "
          "the writes per second")
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "slowdown.json"), "w") as f:
        json.dump({"args": vars(args), "summary": summary, "raw": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
