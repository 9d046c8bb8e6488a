"""deploy/: the DaemonSet validates against Kubernetes' schemas, the seccomp profile
allows what attaching needs, the systemd unit parses and its capability set is
enough for a real attach, and the Containerfile copies files that exist."""
from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from dirtytrack.daemon import config as config_mod

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(REPO, "deploy")
NEEDED_SYSCALLS = {"userfaultfd", "pidfd_getfd", "pidfd_open", "ptrace", "ioctl", "mmap",
                   "process_vm_readv", "epoll_wait", "wait4"}


def load_yaml(*path):
    with open(os.path.join(DEPLOY, *path)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def daemonset():
    (ds,) = [d for d in load_yaml("kubernetes", "daemonset.yaml") if d["kind"] == "DaemonSet"]
    return ds


def config_env_ok(env: dict) -> config_mod.Config:
    """The variables are real settings, and the daemon accepts their values."""
    known = {f"DIRTYTRACK_{f.name.upper()}" for f in config_mod.fields(config_mod.Config)}
    assert set(env) <= known, set(env) - known
    return config_mod.load({}, env=dict(env, DIRTYTRACK_CONFIG="/dev/null"))


# -- Kubernetes ---------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["1.29", "1.37"])
def test_daemonset_validates_against_kubernetes_schemas(version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in load_yaml("kubernetes", "daemonset.yaml"):
        kubernetes_validate.validate(doc, version, strict=True)


def test_daemonset_privileges_ports_and_probes_fit_the_daemon():
    ds = daemonset()
    pod = ds["spec"]["template"]
    spec = pod["spec"]
    assert spec["hostPID"] is True
    (c,) = spec["containers"]
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["SYS_PTRACE"]}
    assert not sc.get("privileged") and sc["allowPrivilegeEscalation"] is False
    assert sc["seccompProfile"]["type"] == "Localhost"
    assert os.path.basename(sc["seccompProfile"]["localhostProfile"]) == "dirtytrack.json"
    assert os.path.exists(os.path.join(DEPLOY, "seccomp", "dirtytrack.json"))

    env = {e["name"]: e["value"] for e in c["env"]}
    cfg = config_env_ok(env)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert int(cfg.metrics_listen.rpartition(":")[2]) == ports["metrics"]
    assert int(cfg.health_listen.rpartition(":")[2]) == ports["health"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["grpc"]["port"] == ports["health"]
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == ports["metrics"]
    assert ann["prometheus.io/path"] == "/metrics"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    (name,) = host
    assert host[name] == mounts[name] == os.path.dirname(cfg.socket) == "/run/dirtytrack"


# -- seccomp ------------------------------------------------------------------------------

def test_seccomp_profile_allows_userfaultfd_and_attaching():
    with open(os.path.join(DEPLOY, "seccomp", "dirtytrack.json")) as f:
        profile = json.load(f)
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    allowed, seen = set(), []
    for rule in profile["syscalls"]:
        assert rule["action"].startswith("SCMP_ACT_"), rule
        for arg in rule.get("args", []):
            assert arg["op"].startswith("SCMP_CMP_") and isinstance(arg["value"], int)
        seen += [(n, json.dumps(rule.get("args"))) for n in rule["names"]]
        if rule["action"] == "SCMP_ACT_ALLOW" and not rule.get("args"):
            allowed.update(rule["names"])
    assert len(seen) == len(set(seen)), "a syscall listed twice with the same arguments"
    assert NEEDED_SYSCALLS <= allowed, NEEDED_SYSCALLS - allowed
    # still a default-deny profile: what containers never get stays denied
    assert not allowed & {"mount", "kexec_load", "bpf", "init_module", "unshare", "setns",
                          "perf_event_open", "reboot"}


# -- systemd ------------------------------------------------------------------------------

def unit():
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       dict_type=dict, empty_lines_in_values=False)
    parser.optionxform = str
    parser.read(os.path.join(DEPLOY, "systemd", "dirtytrack.service"))
    return parser


def test_systemd_unit_parses_and_keeps_ptrace_and_userfaultfd():
    path = os.path.join(DEPLOY, "systemd", "dirtytrack.service")
    svc = unit()["Service"]
    assert svc["CapabilityBoundingSet"].split() == ["CAP_SYS_PTRACE"]
    assert svc["RuntimeDirectory"] == "dirtytrack"
    assert os.path.dirname(config_mod.DEFAULT_SOCKET) == "/run/" + svc["RuntimeDirectory"]
    assert svc["RuntimeDirectoryMode"] == "0700"
    assert svc["Restart"] == "on-failure"
    for breaks_tracking in ("PrivateUsers", "PrivatePIDs", "PrivateDevices"):
        assert breaks_tracking not in svc, breaks_tracking
    assert svc.get("ProtectProc", "default") != "invisible"
    assert svc["ExecStart"].split()[1:] == ["serve"]
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return                                   # the structural checks above only
    # The syscall filter, expanded by systemd itself, covers what attaching needs.
    todo, done, allowed = svc["SystemCallFilter"].split(), set(), set()
    while todo:
        g = todo.pop()
        if g in done:
            continue
        done.add(g)
        if not g.startswith("@"):
            allowed.add(g)
            continue
        out = subprocess.run([analyze, "syscall-filter", g], capture_output=True, text=True,
                             check=True).stdout
        for line in out.splitlines()[1:]:              # the group's name, then its members
            word = line.strip()
            if word.startswith("@") or re.fullmatch(r"[a-z0-9_]+", word):
                todo.append(word)
    assert NEEDED_SYSCALLS <= allowed, NEEDED_SYSCALLS - allowed
    # `verify` needs ExecStart's binary to exist: point it at this Python.
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"dirtytrack-verify-{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    try:
        with open(path) as f:
            text = f.read().replace("/usr/local/bin/dirtytrack", sys.executable)
        copy = os.path.join(tmp, "dirtytrack.service")
        with open(copy, "w") as f:
            f.write(text)
        r = subprocess.run([analyze, "verify", copy], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and "dirtytrack.service" not in r.stderr, r.stderr
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_unit_capabilities_are_enough_for_a_real_attach(tmp_path):
    """Run the daemon with only the unit's capability set (and no_new_privs), as systemd
    would, and attach to the real C target and collect what it wrote."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    from daemon_support import _die_with_parent, _pythonpath
    from dirtytrack.daemon.client import Client
    from workloads.target import PAGE, Target, target_binary
    caps = [c.lower().removeprefix("cap_") for c in
            unit()["Service"]["CapabilityBoundingSet"].split()]
    sock = tmp_path / "run" / "d.sock"
    log = open(tmp_path / "daemon.log", "wb")
    daemon = subprocess.Popen(
        [setpriv, "--no-new-privs", "--bounding-set=-all," + ",".join("+" + c for c in caps),
         "--inh-caps=-all", sys.executable, "-m", "dirtytrack", "serve",
         "--socket", str(sock), "--metrics-listen", ""],
        env=dict(os.environ, PYTHONPATH=_pythonpath(), DIRTYTRACK_CONFIG="/dev/null"),
        stdout=log, stderr=log, preexec_fn=_die_with_parent)
    t = Target(target_binary(str(tmp_path)))
    try:
        with Client(f"unix:{sock}") as c:
            deadline = time.monotonic() + 20
            while not sock.exists():
                assert daemon.poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "daemon.log").read_text()
                time.sleep(0.05)
            with open(f"/proc/{daemon.pid}/status") as f:
                status = dict(line.split(":", 1) for line in f)
            assert int(status["CapEff"], 16) == 1 << 19          # CAP_SYS_PTRACE only
            buf = t.map(16)
            cursor = c.open_cursor(c.attach(t.pid).target.target_id)
            c.collect(cursor)
            t.write(buf + 3 * PAGE, 2)
            s = c.collect(cursor)
            assert {a for a in s.pages() if buf <= a < buf + 16 * PAGE} == \
                {buf + 3 * PAGE, buf + 4 * PAGE}
    finally:
        t.close()
        daemon.terminate()
        daemon.wait(15)
        log.close()


# -- container image ----------------------------------------------------------------------

def test_containerfile_copies_files_that_exist_and_runs_the_daemon():
    path = os.path.join(DEPLOY, "container", "Containerfile")
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    copies = [line.split()[1:] for line in lines if line.startswith("COPY ")]
    assert copies
    for args in copies:
        if any(a.startswith("--from=") for a in args):
            continue
        for src in args[:-1]:
            assert os.path.exists(os.path.join(REPO, src)), f"COPY {src}: not in the repository"
    # the build context has what `pip wheel .` needs
    copied = {a for args in copies for a in args[:-1]}
    assert {"pyproject.toml", "setup.py", "ext", "proto", "service"} <= copied
    assert sum(line.startswith("FROM ") for line in lines) == 2
    assert any("pip wheel" in line for line in lines)
    env = {}
    for line in lines:
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line.replace("\\", " ")))
    config_env_ok({k: v for k, v in env.items() if k.startswith("DIRTYTRACK_")})
    assert 'ENTRYPOINT ["dirtytrack"]' in lines
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        assert 'dirtytrack = "dirtytrack.cli:main"' in f.read()


def test_health_port_answers_probes_and_serves_nothing_else():
    """The DaemonSet's probe port: grpc.health.v1 in plain TCP, the API never."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from daemon_support import Daemon
    from dirtytrack.v1 import dirtytrack_pb2 as pb
    from dirtytrack.v1 import dirtytrack_pb2_grpc as pb_grpc
    import socket as socket_mod
    with socket_mod.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = Daemon("--health-listen", f"127.0.0.1:{port}")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.DirtyTrackerStub(ch).ListTargets(pb.ListTargetsRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        d.close()
