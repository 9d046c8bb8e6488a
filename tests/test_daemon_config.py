"""Configuration precedence through `dirtytrack serve` itself: a flag beats the
DIRTYTRACK_* environment, which beats the TOML file, which beats the default.

tests/test_daemon_units.py checks config.load(); these start the real command, so the
CLI's flag mapping (--interval-ms is default_interval_ms, an absent --insecure-tcp is
"not given", not "false"), --config against $DIRTYTRACK_CONFIG and the [daemon] table
are covered too. What a daemon uses is read from outside: where its socket is, the
scan interval it reports for a target, whether it serves plain TCP.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from daemon_support import _die_with_parent, _pythonpath
from dirtytrack.daemon.client import Client
from workloads.target import Target

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="attaching needs root (ptrace)")


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIRTYTRACK_")}
    # no metrics endpoint: its default port would be shared by every daemon here
    env.update(PYTHONPATH=_pythonpath(), DIRTYTRACK_CONFIG="/dev/null",
               DIRTYTRACK_METRICS_LISTEN="")
    env.update(extra)
    return env


class Serve:
    """`python -m dirtytrack serve ARGS` with exactly the environment given."""

    def __init__(self, tmp_path, args: list[str], env: dict, expect_socket: str | None):
        self.log_path = tmp_path / f"serve-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "dirtytrack", "serve", *args],
                                     env=env, stdout=self.log, stderr=self.log,
                                     preexec_fn=_die_with_parent)
        if expect_socket:
            self.wait_serving(f"unix:{expect_socket}", expect_socket)

    def logtext(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_serving(self, address: str, path: str | None = None, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve exited: {self.logtext()}"
            if path is None or os.path.exists(path):
                with grpc.insecure_channel(address) as ch:
                    try:
                        r = health_pb2_grpc.HealthStub(ch).Check(
                            health_pb2.HealthCheckRequest(), timeout=1)
                        if r.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                    except grpc.RpcError:
                        pass
            time.sleep(0.05)
        raise AssertionError(f"serve not serving on {address}: {self.logtext()}")

    def close(self) -> None:
        if self.log.closed:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def serve(tmp_path):
    started = []

    def start(args, env, expect_socket=None) -> Serve:
        s = Serve(tmp_path, args, env, expect_socket)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


@pytest.fixture(scope="module")
def target(target_bin):
    t = Target(target_bin)
    t.map(4)
    yield t
    t.close()


def scan_interval_ms(sock: str, pid: int) -> int:
    with Client(f"unix:{sock}") as c:
        return c.attach(pid).target.scan_interval_ms


@pytest.fixture
def layers(tmp_path):
    """Socket path and scan interval set in every layer, each to its own value."""
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    toml = tmp_path / "dirtytrack.toml"
    toml.write_text(f'[daemon]\nsocket = "{d}/file.sock"\ndefault_interval_ms = 300\n')
    return {
        "dir": d, "toml": str(toml),
        "env": {"DIRTYTRACK_SOCKET": f"{d}/env.sock", "DIRTYTRACK_DEFAULT_INTERVAL_MS": "200"},
        "flags": ["--socket", f"{d}/flag.sock", "--interval-ms", "100"],
    }


@needs_root
@pytest.mark.parametrize("winner, interval", [("flag", 100), ("env", 200), ("file", 300)])
def test_flag_beats_env_beats_file(serve, target, layers, winner, interval):
    d = layers["dir"]
    args = ["--config", layers["toml"], "--log-level", "WARNING"]
    env = clean_env()
    if winner == "flag":
        args += layers["flags"]
    if winner in ("flag", "env"):
        env.update(layers["env"])
    sock = f"{d}/{winner}.sock"
    serve(args, env, expect_socket=sock)
    assert sorted(p.name for p in d.iterdir()) == [f"{winner}.sock"]
    assert scan_interval_ms(sock, target.pid) == interval


@needs_root
def test_file_beats_default_and_layers_apply_key_by_key(serve, target, tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    toml = tmp_path / "top-level.toml"
    toml.write_text(f'socket = "{d}/file.sock"\n')         # top-level keys, no [daemon] table
    first = serve(["--config", str(toml)], clean_env(), expect_socket=f"{d}/file.sock")
    assert scan_interval_ms(f"{d}/file.sock", target.pid) == 1000       # the default
    first.close()                                  # releases the target for the next one

    # Per key: the socket from a flag, the interval from the environment; neither the
    # file's socket nor its interval leaks through.
    toml.write_text(f'socket = "{d}/file2.sock"\ndefault_interval_ms = 700\n')
    serve(["--config", str(toml), "--socket", f"{d}/flag2.sock"],
          clean_env(DIRTYTRACK_DEFAULT_INTERVAL_MS="250"), expect_socket=f"{d}/flag2.sock")
    assert not os.path.exists(f"{d}/file2.sock")
    assert scan_interval_ms(f"{d}/flag2.sock", target.pid) == 250


@needs_root
def test_config_flag_beats_the_config_variable(serve, target, tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    from_env, from_flag = tmp_path / "env.toml", tmp_path / "flag.toml"
    from_env.write_text(f'[daemon]\nsocket = "{d}/a.sock"\ndefault_interval_ms = 400\n')
    from_flag.write_text(f'[daemon]\nsocket = "{d}/b.sock"\ndefault_interval_ms = 500\n')
    first = serve([], clean_env(DIRTYTRACK_CONFIG=str(from_env)), expect_socket=f"{d}/a.sock")
    assert scan_interval_ms(f"{d}/a.sock", target.pid) == 400
    first.close()
    serve(["--config", str(from_flag)], clean_env(DIRTYTRACK_CONFIG=str(from_env)),
          expect_socket=f"{d}/b.sock")
    assert scan_interval_ms(f"{d}/b.sock", target.pid) == 500


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("layer", ["env", "file"])
def test_an_absent_flag_does_not_override_a_boolean_from_env_or_file(serve, tmp_path, layer):
    """`--insecure-tcp` not given must leave insecure_tcp to the lower layers."""
    port = free_port()
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    env = clean_env()
    args = ["--socket", f"{d}/d.sock"]
    if layer == "env":
        env.update(DIRTYTRACK_LISTEN=f"127.0.0.1:{port}", DIRTYTRACK_INSECURE_TCP="true")
    else:
        toml = tmp_path / "d.toml"
        toml.write_text(f'[daemon]\nlisten = "127.0.0.1:{port}"\ninsecure_tcp = true\n')
        args += ["--config", str(toml)]
    s = serve(args, env, expect_socket=f"{d}/d.sock")
    s.wait_serving(f"127.0.0.1:{port}")


@pytest.mark.parametrize("where", ["env", "file"])
def test_a_bad_value_names_its_layer_and_stops_serve(tmp_path, where):
    env = clean_env()
    args = [sys.executable, "-m", "dirtytrack", "serve", "--socket", str(tmp_path / "d.sock")]
    if where == "env":
        env["DIRTYTRACK_DEFAULT_INTERVAL_MS"] = "fast"
        named = "environment DIRTYTRACK_DEFAULT_INTERVAL_MS"
    else:
        toml = tmp_path / "d.toml"
        toml.write_text('[daemon]\ndefault_interval_ms = "fast"\n')
        args += ["--config", str(toml)]
        named = f"config file {toml}"
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=20)
    assert done.returncode == 2, done
    assert named in done.stderr and "'fast'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "d.sock").exists()
    # ... and a flag given on top wins over the bad lower layer.
    ok = subprocess.run(args + ["--interval-ms", "100", "--listen", "127.0.0.1:1"],
                        env=env, capture_output=True, text=True, timeout=20)
    assert ok.returncode == 2 and "fast" not in ok.stderr and "needs TLS" in ok.stderr, ok.stderr


def test_port_in_use_is_one_clear_line(tmp_path):
    """Another process holds the TCP port: serve says so and leaves no socket."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    sock = str(tmp_path / "d" / "dirtytrack.sock")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "dirtytrack", "serve", "--socket", sock,
             "--listen", f"127.0.0.1:{port}", "--insecure-tcp"],
            capture_output=True, text=True, timeout=30, env=clean_env())
    finally:
        holder.close()
    assert proc.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(sock)


@pytest.mark.parametrize("flag", ["--metrics-listen", "--health-listen"])
def test_busy_metrics_or_health_port_is_one_clear_line(tmp_path, flag):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    sock = str(tmp_path / "d" / "dirtytrack.sock")
    try:
        proc = subprocess.run([sys.executable, "-m", "dirtytrack", "serve", "--socket", sock,
                               flag, f"127.0.0.1:{port}"],
                              capture_output=True, text=True, timeout=30, env=clean_env())
    finally:
        holder.close()
    assert proc.returncode != 0
    assert f"127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(sock)
