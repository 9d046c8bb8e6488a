"""A real daemon (`python -m dirtytrack serve`) on a real Unix socket, for tests."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import dirtytrack


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies (even SIGKILLed)."""
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)          # PR_SET_PDEATHSIG


def _pythonpath() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(dirtytrack.__file__)))
    return os.pathsep.join([here] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p])


class Daemon:
    def __init__(self, *extra: str, sock_dir: str | None = None, env: dict | None = None):
        self.dir = sock_dir or tempfile.mkdtemp(prefix="dt-")
        os.chmod(self.dir, 0o700)
        self.socket = os.path.join(self.dir, "d.sock")
        self.address = f"unix:{self.socket}"
        self.log = open(os.path.join(self.dir, "daemon.log"), "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dirtytrack", "serve", "--socket", self.socket,
             "--log-level", "INFO", *extra],
            # metrics off unless a test asks (--metrics-listen): the default port is shared
            env=dict(os.environ, PYTHONPATH=_pythonpath(), DIRTYTRACK_CONFIG="/dev/null",
                     **{"DIRTYTRACK_METRICS_LISTEN": "", **(env or {})}),
            stdout=self.log, stderr=self.log, preexec_fn=_die_with_parent)
        self.wait_serving()

    def wait_serving(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"daemon exited: {self.logtext()}"
            if os.path.exists(self.socket):
                with grpc.insecure_channel(self.address) as ch:
                    try:
                        r = health_pb2_grpc.HealthStub(ch).Check(
                            health_pb2.HealthCheckRequest(), timeout=2)
                        if r.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                    except grpc.RpcError:
                        pass
            time.sleep(0.05)
        raise AssertionError(f"daemon not serving: {self.logtext()}")

    def logtext(self) -> str:
        self.log.flush()
        with open(os.path.join(self.dir, "daemon.log"), errors="replace") as f:
            return f.read()[-4000:]

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"daemon ignored SIGTERM: {self.logtext()}")
        return self.proc.returncode

    def close(self, remove: bool = True) -> None:
        try:
            self.stop()
        finally:
            self.log.close()
            if remove:
                shutil.rmtree(self.dir, ignore_errors=True)
