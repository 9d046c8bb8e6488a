"""The grpc.aio server: Unix socket (root only) and optional TLS TCP,
health and reflection, clean shutdown on SIGTERM/SIGINT."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from dirtytrack.daemon.metrics import Metrics
from dirtytrack.daemon.registry import Registry
from dirtytrack.daemon.servicer import DirtyTrackerServicer
from dirtytrack.v1 import dirtytrack_pb2 as pb
from dirtytrack.v1 import dirtytrack_pb2_grpc as pb_grpc

log = logging.getLogger("dirtytrack.daemon")
SERVICE = pb.DESCRIPTOR.services_by_name["DirtyTracker"].full_name


def _prepare_socket(path: str) -> None:
    """A 0700 directory; a stale socket from a killed daemon is removed, a live one refused."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.stat(directory)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise SystemExit(f"{directory} must belong to this user and not be group/world "
                         "writable: the socket's safety depends on it")
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise SystemExit(f"{path} exists and is not a socket: refusing to replace it")
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)              # stale: its daemon is gone
        else:
            raise SystemExit(f"another daemon is serving on {path}")
        finally:
            probe.close()


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise SystemExit(f"dirtytrack serve: {flag} {path}: {exc.strerror}") from None


async def serve(config, ready=None) -> int:
    creds = None
    if config.listen and not config.insecure_tcp:    # read before anything is served
        creds = grpc.ssl_server_credentials(
            [(_read(config.tls_key, "--tls-key"), _read(config.tls_cert, "--tls-cert"))],
            root_certificates=(_read(config.tls_client_ca, "--tls-client-ca")
                               if config.tls_client_ca else None),
            require_client_auth=bool(config.tls_client_ca))
    registry = Registry(config)
    options = [("grpc.max_send_message_length", 4 << 20),
               ("grpc.max_receive_message_length", 4 << 20),
               ("grpc.so_reuseport", 0)]
    metrics = Metrics(registry)
    server = grpc.aio.server(options=options, interceptors=metrics.interceptors())
    pb_grpc.add_DirtyTrackerServicer_to_server(DirtyTrackerServicer(registry), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    if config.socket:
        _prepare_socket(config.socket)
        old = os.umask(0o177)            # the socket is born 0600
        try:
            server.add_insecure_port(f"unix:{config.socket}")
        finally:
            os.umask(old)
    def give_up(message: str):
        # Before anything was started: leave no socket behind, print one line.
        if config.socket and os.path.exists(config.socket):
            os.unlink(config.socket)
        return SystemExit(f"dirtytrack serve: {message}")

    if config.listen:
        try:
            if creds is None:
                server.add_insecure_port(config.listen)
            else:
                server.add_secure_port(config.listen, creds)
        except RuntimeError:
            raise give_up(f"cannot listen on {config.listen}: the address is in use or not "
                          "local (another daemon? choose another port)") from None
    probe = None
    if config.health_listen:         # health only: safe in plain text (Kubernetes grpc probes)
        probe = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health, probe)
        try:
            probe.add_insecure_port(config.health_listen)
        except RuntimeError:
            raise give_up(f"cannot serve health checks on {config.health_listen}: the address "
                          "is in use or not local (set --health-listen to another HOST:PORT)"
                          ) from None
    try:
        metrics.start(config.metrics_listen)
    except SystemExit as exc:
        raise give_up(str(exc)) from None
    await server.start()
    if config.socket:
        os.chmod(config.socket, 0o600)
    if probe is not None:
        await probe.start()
    for name in ("", SERVICE):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("dirtytrack daemon %s serving on %s", registry.instance,
             ", ".join(filter(None, [config.socket and f"unix:{config.socket}", config.listen])))
    if ready is not None:
        ready(registry)

    async def expire():
        while True:
            await asyncio.sleep(min(60.0, config.cursor_idle_timeout_s / 4))
            registry.expire_idle()

    janitor = loop.create_task(expire())
    try:
        await stop.wait()
    finally:
        log.info("shutting down: health NOT_SERVING, ending streams")
        await health.enter_graceful_shutdown()
        registry.stopping = True
        for cursor in registry.cursors.values():
            cursor.wake.set()                 # streams end with UNAVAILABLE
        janitor.cancel()
        await server.stop(config.shutdown_grace_s)
        if probe is not None:
            await probe.stop(0)
        metrics.stop()
        await registry.close()
        if config.socket and os.path.exists(config.socket):
            os.unlink(config.socket)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0
