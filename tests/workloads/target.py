"""Drive tests/workloads/target.c: a real process that does what the test
says and reports what it wrote, so tests compare against ground truth."""
from __future__ import annotations

import ctypes
import functools
import mmap
import os
import shutil
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = mmap.PAGESIZE


@functools.lru_cache(maxsize=None)
def target_binary(build_dir: str) -> str:
    if shutil.which("cc") is None:
        raise RuntimeError("a C compiler (cc) is needed to build the test target")
    out = os.path.join(build_dir, "target")
    subprocess.run(["cc", "-O2", "-Wall", "-pthread", "-o", out,
                    os.path.join(HERE, "target.c")], check=True)
    return out


class Target:
    def __init__(self, binary: str):
        self.proc = subprocess.Popen([binary], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        ready = self.proc.stdout.readline().split()
        assert ready and ready[0] == "ready", ready
        self.pid = int(ready[1])
        self._epochs = None
        self.counters = None

    def cmd(self, line: str) -> list[str]:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().split()
        if not answer or answer[0] == "err":
            raise OSError(int(answer[1]) if answer else 0, f"target: {line!r} -> {answer}")
        return answer

    def map(self, npages: int) -> int:
        return int(self.cmd(f"map {npages}")[1])

    def map_shared(self, npages: int) -> tuple[int, int]:
        answer = self.cmd(f"mapshm {npages}")
        return int(answer[1]), int(answer[3])

    def write(self, addr: int, npages: int = 1, seed: int = 1) -> None:
        self.cmd(f"write {addr} {npages} {seed & 0xFF}")

    def pages(self, addr: int, npages: int) -> set[int]:
        return {addr + i * PAGE for i in range(npages)}

    # The concurrent writer: its log windows use two counters in a shared
    # page that the test bumps around each collect (see target.c).
    def start_writer(self, addr: int, npages: int) -> None:
        epoch_addr, fd = self.map_shared(1)
        local = os.open(f"/proc/{self.pid}/fd/{fd}", os.O_RDWR)
        self._epochs = mmap.mmap(local, PAGE)
        os.close(local)
        # [0] collects finished, [1] collects started. Bumped with single
        # 8-byte stores: struct.pack_into zero-fills before packing, so the
        # writer could read a torn 0 between the two.
        self.counters = (ctypes.c_uint64 * 2).from_buffer(self._epochs)
        self.cmd(f"writer {addr} {npages} {epoch_addr}")

    def collect_with_window(self, collect):
        self.counters[1] += 1
        result = collect()
        self.counters[0] += 1
        return result

    def stop_writer(self) -> list[tuple[int, int, int]]:
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        log = []
        for line in self.proc.stdout:
            fields = line.split()
            if fields[0] == "stopped":
                break
            log.append((int(fields[1]), int(fields[2]), int(fields[3])))
        return log

    def close(self) -> None:
        if self._epochs is not None:
            self.counters = None
            self._epochs.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()
