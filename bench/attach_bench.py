#!/usr/bin/env python3
"""How long a target thread is stopped while dirtytrack injects userfaultfd() into it.

Not a test: CI does not run it. Needs root (ptrace) and cc.

    cd /tmp/wt-inject && PYTHONPATH=service /tmp/venv/bin/python bench/attach_bench.py \
        [--attaches N] [--json bench/out/attach.json]

Targets are tests/inject_children/child.c, compiled here, in three states:

  sleeping  in a 1 ms nanosleep loop (the common idle service)
  reading   blocked in read() on a pipe
  spinning  4 threads: the main one sleeping, 3 spinning in user code; the
            injection goes through a spinning one (tid=) - the thread that
            has to be taken off a CPU

For each, N attaches (inject_userfaultfd + close of the fd we got). Reported:
stopped = PTRACE_INTERRUPT issued -> PTRACE_DETACH returned (an upper bound on
the thread's stop), total = the whole call including /proc reads done before
the thread is stopped. Median, p90 and max, in microseconds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "service"))

from dirtytrack import _core  # noqa: E402


def build_child(workdir: str) -> str:
    exe = os.path.join(workdir, "child")
    subprocess.run(["cc", "-O2", "-pthread", "-o", exe,
                    str(ROOT / "tests" / "inject_children" / "child.c")], check=True)
    return exe


def start(exe: str, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([exe, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    proc.stdout.readline()                      # "buf ..." : it is set up
    return proc


def wait_workers(pid: int) -> list[int]:
    """Tids of the worker threads, once all three are spinning in user code."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
        if len(tids) == 3 and all(_core._thread_syscall(pid, t) == -1 for t in tids):
            return tids
        time.sleep(0.001)
    raise RuntimeError("worker threads did not start")


def measure(pid: int, n: int, tid: int | None) -> dict:
    stopped, total = [], []
    for _ in range(n):
        inj = _core.inject_userfaultfd(pid, tid=tid)
        os.close(inj.fd)
        stopped.append(inj.stopped_ns / 1e3)
        total.append(inj.total_ns / 1e3)
        time.sleep(0.001)                       # let the target run between attaches

    def summary(xs):
        xs = sorted(xs)
        return {"median_us": round(statistics.median(xs), 1),
                "p90_us": round(xs[int(0.9 * (len(xs) - 1))], 1),
                "max_us": round(xs[-1], 1)}
    return {"stopped": summary(stopped), "total": summary(total), "attaches": n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--attaches", type=int, default=200)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("attach_bench needs root (ptrace of another process)")
    if shutil.which("cc") is None:
        sys.exit("attach_bench needs a C compiler (cc)")
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        exe = build_child(workdir)
        for name, mode in (("sleeping", "sleep"), ("reading", "pipe"), ("spinning", "threads")):
            proc = start(exe, mode)
            try:
                tid = wait_workers(proc.pid)[0] if mode == "threads" else None
                results[name] = measure(proc.pid, args.attaches, tid)
            finally:
                proc.kill()
                proc.wait()
                proc.stdin.close()
                proc.stdout.close()
    print(f"inject_userfaultfd: {args.attaches} attaches per target, "
          f"{platform.release()} {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"{'target':<10} {'stopped median':>15} {'p90':>9} {'max':>9} {'total median':>13}")
    for name, r in results.items():
        s, t = r["stopped"], r["total"]
        print(f"{name:<10} {s['median_us']:>12.1f} us {s['p90_us']:>6.1f} us "
              f"{s['max_us']:>6.1f} us {t['median_us']:>10.1f} us")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"kernel": platform.release(),
                                               "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
