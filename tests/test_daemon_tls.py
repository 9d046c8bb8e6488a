"""The daemon over TCP: TLS, mutual TLS, and the refusal of plain TCP.

A throwaway CA, a server certificate (SAN 127.0.0.1 and localhost) and client
certificates are made with the openssl CLI at test time; the daemon is a real
`python -m dirtytrack serve` listening on 127.0.0.1 only.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from daemon_support import Daemon, _pythonpath
from dirtytrack.daemon.client import Client
from dirtytrack.v1 import dirtytrack_pb2 as pb
from workloads.target import PAGE, Target

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="attaching needs root (ptrace)")


def _openssl(*args: str, cwd: str) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"openssl {' '.join(args)}: {done.stderr}"


def _key_and_csr(d: str, name: str, cn: str) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)


def _ca(d: str, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN=dirtytrack test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _sign(d: str, name: str, ca: str, extensions: str) -> None:
    with open(os.path.join(d, f"{name}.ext"), "w") as f:
        f.write(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{name}.ext",
             "-out", f"{name}.pem", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """ca, server (signed by ca), client (signed by ca), rogue-client (signed by other-ca)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make throwaway certificates")
    d = str(tmp_path_factory.mktemp("pki"))
    _ca(d, "ca")
    _ca(d, "other-ca")
    _key_and_csr(d, "server", "localhost")
    _sign(d, "server", "ca", "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
          "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ca in (("client", "ca"), ("rogue-client", "other-ca")):
        _key_and_csr(d, name, name)
        _sign(d, name, ca, "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
              "extendedKeyUsage=clientAuth\n")
    return lambda name: os.path.join(d, name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tls_daemon(pki, mutual: bool) -> tuple[Daemon, str]:
    port = free_port()
    extra = ["--listen", f"127.0.0.1:{port}", "--tls-cert", pki("server.pem"),
             "--tls-key", pki("server.key")]
    if mutual:
        extra += ["--tls-client-ca", pki("ca.pem")]
    return Daemon(*extra), f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def tls(pki):
    d, address = tls_daemon(pki, mutual=False)
    yield d, address
    d.close()


@pytest.fixture(scope="module")
def mtls(pki):
    d, address = tls_daemon(pki, mutual=True)
    yield d, address
    d.close()


@pytest.fixture
def target(target):
    """One target process (conftest's factory, used once)."""
    return target()


def health(channel: grpc.Channel, timeout: float = 5):
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="dirtytrack.v1.DirtyTracker"), timeout=timeout)


def refused(channel: grpc.Channel) -> grpc.RpcError:
    """The call must fail at the transport (handshake), never reach the service."""
    with channel:
        with pytest.raises(grpc.RpcError) as e:
            health(channel, timeout=3)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
    return e.value


def creds(pki, ca="ca.pem", client: str | None = None):
    def read(name):
        with open(pki(name), "rb") as f:
            return f.read()
    return grpc.ssl_channel_credentials(
        read(ca), client and read(f"{client}.key"), client and read(f"{client}.pem"))


def attach_write_collect(c: Client, t: Target) -> None:
    """Attach over the channel, write known pages, Collect them back exactly."""
    buf = t.map(64)
    tid = c.attach(t.pid).target.target_id
    cursor = c.open_cursor(tid)
    c.collect(cursor)                          # whatever the attach itself caused
    t.write(buf + 3 * PAGE, 5)
    t.write(buf + 40 * PAGE, 1)
    s = c.collect(cursor)
    got = {(a - buf) // PAGE for a in s.pages() if buf <= a < buf + 64 * PAGE}
    assert got == {3, 4, 5, 6, 7, 40}, got
    assert s.seq == 2 and not s.full_resync
    c.stub.Detach(pb.DetachRequest(target_id=tid), timeout=10)


# -- TLS ------------------------------------------------------------------------

@needs_root
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_tls_client_with_the_ca_attaches_and_collects(tls, pki, target, host):
    d, address = tls
    port = address.rsplit(":", 1)[1]
    with Client(f"{host}:{port}", tls_ca=pki("ca.pem")) as c:
        attach_write_collect(c, target)


def test_tls_port_refuses_plaintext_and_untrusted_clients(tls, pki):
    d, address = tls
    with grpc.secure_channel(address, creds(pki)) as ch:        # the control: it does work
        assert health(ch).status == health_pb2.HealthCheckResponse.SERVING
    refused(grpc.insecure_channel(address))
    # A client that does not trust the daemon's CA does not talk to it either.
    refused(grpc.secure_channel(address, creds(pki, ca="other-ca.pem")))


def test_unix_socket_stays_0600_beside_tcp(tls, mtls):
    for d, _ in (tls, mtls):
        assert oct(os.stat(d.socket).st_mode & 0o777) == "0o600"
        assert oct(os.stat(d.dir).st_mode & 0o777) == "0o700"
        with grpc.insecure_channel(d.address) as ch:            # local clients need no TLS
            assert health(ch).status == health_pb2.HealthCheckResponse.SERVING


# -- mutual TLS -----------------------------------------------------------------

@needs_root
def test_mtls_client_with_a_cert_attaches_and_collects(mtls, pki, target):
    d, address = mtls
    with Client(address, tls_ca=pki("ca.pem"), tls_cert=pki("client.pem"),
                tls_key=pki("client.key")) as c:
        attach_write_collect(c, target)


def test_mtls_refuses_clients_without_a_cert_from_its_ca(mtls, pki):
    d, address = mtls
    with grpc.secure_channel(address, creds(pki, client="client")) as ch:   # the control
        assert health(ch).status == health_pb2.HealthCheckResponse.SERVING
    refused(grpc.secure_channel(address, creds(pki)))                      # no certificate
    refused(grpc.secure_channel(address, creds(pki, client="rogue-client")))  # another CA
    refused(grpc.insecure_channel(address))                                # plaintext
    assert d.proc.poll() is None, "refused handshakes must not hurt the daemon"


# -- plain TCP ------------------------------------------------------------------

def serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`dirtytrack serve` expected to refuse to start (a timeout means it served)."""
    return subprocess.run(
        [sys.executable, "-m", "dirtytrack", "serve", *args], capture_output=True, text=True,
        timeout=20, env=dict(os.environ, PYTHONPATH=_pythonpath(), DIRTYTRACK_CONFIG="/dev/null",
                             **(env or {})))


def test_plain_tcp_is_refused_at_startup_without_the_insecure_flag(tmp_path):
    port = free_port()
    sock_dir = tmp_path / "s"
    done = serve("--socket", str(sock_dir / "d.sock"), "--listen", f"127.0.0.1:{port}")
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "needs TLS" in done.stderr and "--tls-cert" in done.stderr
    assert "--insecure-tcp" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not (sock_dir / "d.sock").exists(), "it must refuse before serving anything"
    # The same through the environment: a TLS setting cannot be dodged by moving it there.
    env_listen = serve("--socket", str(sock_dir / "d.sock"),
                       env={"DIRTYTRACK_LISTEN": f"127.0.0.1:{port}"})
    assert env_listen.returncode == 2 and "needs TLS" in env_listen.stderr, env_listen.stderr


def test_mtls_ca_without_listen_is_refused(tmp_path, pki):
    done = serve("--socket", str(tmp_path / "s" / "d.sock"),
                 "--tls-client-ca", pki("ca.pem"))
    assert done.returncode == 2 and "--listen" in done.stderr, done.stderr


def test_plain_tcp_with_the_insecure_flag_serves_plaintext():
    port = free_port()
    d = Daemon("--listen", f"127.0.0.1:{port}", "--insecure-tcp")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert health(ch).status == health_pb2.HealthCheckResponse.SERVING
        assert oct(os.stat(d.socket).st_mode & 0o777) == "0o600"
    finally:
        d.close()


def test_unreadable_tls_files_are_refused_at_startup_clearly(tmp_path, pki):
    """A typo in a certificate path: one line saying which file, before anything is served."""
    sock = tmp_path / "s" / "d.sock"
    for missing in ("--tls-cert", "--tls-key", "--tls-client-ca"):
        files = {"--tls-cert": pki("server.pem"), "--tls-key": pki("server.key"),
                 "--tls-client-ca": pki("ca.pem"), missing: str(tmp_path / "nope.pem")}
        done = serve("--socket", str(sock), "--listen", f"127.0.0.1:{free_port()}",
                     *[x for kv in files.items() for x in kv])
        assert done.returncode != 0, done
        assert "Traceback" not in done.stderr, done.stderr
        assert str(tmp_path / "nope.pem") in done.stderr and missing in done.stderr, done.stderr
        assert not sock.exists(), "nothing may be served (or left behind) on a refused start"
