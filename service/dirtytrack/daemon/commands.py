"""CLI commands that talk to the daemon: serve, attach, detach, targets,
describe, collect, watch, and the daemon demo."""
from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import time

import grpc

SPARK = "▁▂▃▄▅▆▇█"


def cmd_serve(args) -> int:
    from dirtytrack.daemon import config as config_mod
    from dirtytrack.daemon.server import serve
    flags = dict(socket=args.socket, listen=args.listen, tls_cert=args.tls_cert,
                 tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                 insecure_tcp=True if args.insecure_tcp else None,
                 default_interval_ms=args.interval_ms, log_level=args.log_level,
                 metrics_listen=args.metrics_listen, health_listen=args.health_listen)
    if args.no_socket:
        flags["socket"] = ""
    try:
        cfg = config_mod.load(flags, config_file=args.config)
    except config_mod.ConfigError as exc:
        print(f"dirtytrack serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    return asyncio.run(serve(cfg))


def _client(args):
    from dirtytrack.daemon.client import Client, address_from
    return Client(address_from(getattr(args, "socket", None), getattr(args, "address", None)),
                  tls_ca=getattr(args, "tls_ca", None), tls_cert=getattr(args, "tls_cert", None),
                  tls_key=getattr(args, "tls_key", None))


def _fail(exc: grpc.RpcError) -> int:
    print(f"dirtytrack: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 1


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def cmd_attach(args) -> int:
    ranges = []
    for text in args.range:
        lo, _, hi = text.partition("-")
        ranges.append((int(lo, 0), int(hi, 0)))
    try:
        with _client(args) as c:
            r = c.attach(args.pid, names=args.name, ranges=ranges, no_default=args.no_default)
    except grpc.RpcError as exc:
        return _fail(exc)
    t = r.target
    how = "already attached as" if r.already_attached else "attached:"
    print(f"{how} {t.target_id} pid {t.pid}, {t.mappings_tracked} mappings, "
          f"{_mib(t.bytes_tracked)} tracked")
    return 0


def cmd_detach(args) -> int:
    from dirtytrack.v1 import dirtytrack_pb2 as pb
    try:
        with _client(args) as c:
            c.stub.Detach(pb.DetachRequest(target_id=c.resolve(args.target)), timeout=10)
    except grpc.RpcError as exc:
        return _fail(exc)
    return 0


def cmd_targets(args) -> int:
    from dirtytrack.v1 import dirtytrack_pb2 as pb
    try:
        with _client(args) as c:
            targets = c.targets()
    except grpc.RpcError as exc:
        return _fail(exc)
    print(f"{'target':<24} {'pid':>8} {'state':<9} {'mappings':>8} {'tracked':>12} "
          f"{'cursors':>7} {'scan ms':>8}")
    for t in targets:
        state = pb.TargetState.Name(t.state).removeprefix("TARGET_STATE_").lower()
        print(f"{t.target_id:<24} {t.pid:>8} {state:<9} {t.mappings_tracked:>8} "
              f"{_mib(t.bytes_tracked):>12} {t.cursor_count:>7} {t.last_scan_us / 1000:8.2f}")
    return 0


def cmd_describe(args) -> int:
    try:
        with _client(args) as c:
            print(c.describe(c.resolve(args.target)))
    except grpc.RpcError as exc:
        return _fail(exc)
    return 0


def cmd_collect(args) -> int:
    try:
        with _client(args) as c:
            cursor = args.cursor
            if not cursor:
                cursor = c.open_cursor(c.resolve(args.target), label="cli collect")
                time.sleep(args.wait)
            s = c.collect(cursor, after_seq=args.after)
            c.ack(cursor, s.seq)
    except grpc.RpcError as exc:
        return _fail(exc)
    print(f"cursor {cursor} set {s.seq}: {s.count} dirty pages ({_mib(s.count * s.page_size)})"
          f"{'  FULL RESYNC' if s.full_resync else ''}")
    for code, message in s.resync:
        print(f"  resync: {message}")
    for lo, hi in s.ranges()[:args.limit]:
        print(f"  {lo:#x}-{hi:#x}")
    print(f"next: dirtytrack collect {args.target} --cursor {cursor} --after {s.seq}")
    return 0


def watch(client, target_id: str, seconds: float, interval_ms: int, out=sys.stdout,
          on_set=None, cursor_id: str | None = None) -> tuple[str, int]:
    """Live view of a target's writes; returns (cursor, last acknowledged seq)."""
    cursor = cursor_id or client.open_cursor(target_id, label="watch")
    call, stream = client.subscribe(cursor, interval_ms=interval_ms)
    history: list[float] = []
    began = time.monotonic()
    prev_ns = None
    acked = 0
    print(f"{'time':>6} {'set':>5} {'pages':>8} {'pages/s':>9} {'MiB/s':>8}  history", file=out)
    try:
        for s in stream:
            span = (s.scan_mono_ns - prev_ns) / 1e9 if prev_ns else interval_ms / 1000
            prev_ns = s.scan_mono_ns
            rate = s.count / max(span, 1e-6)
            history = (history + [rate])[-30:]
            top = max(history) or 1
            spark = "".join(SPARK[min(7, int(r / top * 7.999))] for r in history)
            flag = "  FULL RESYNC: " + "; ".join(m for _, m in s.resync) if s.full_resync else ""
            print(f"{time.monotonic() - began:5.1f}s {s.seq:5d} {s.count:8d} {rate:9.0f} "
                  f"{rate * s.page_size / (1 << 20):8.1f}  {spark}{flag}", file=out, flush=True)
            if on_set:
                on_set(s)
            acked = client.ack(cursor, s.seq)
            if s.exited or time.monotonic() - began >= seconds:
                break
    finally:
        call.cancel()
    return cursor, acked


def cmd_watch(args) -> int:
    try:
        with _client(args) as c:
            watch(c, c.resolve(args.target), args.seconds, args.interval_ms)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED:
            return 0
        return _fail(exc)
    return 0


def _wait_for_socket(path: str, proc, timeout: float = 20) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited with status {proc.returncode}")
        if os.path.exists(path):
            with grpc.insecure_channel(f"unix:{path}") as ch:
                try:
                    r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                             timeout=2)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
        time.sleep(0.05)
    raise SystemExit("the daemon did not start serving in time")


def run_demo(size: str, seconds: float, interval_ms: int, rate: int, out=sys.stdout) -> int:
    """Daemon on a temporary socket + the bundled workload + `watch`, checked."""
    from dirtytrack.daemon.client import Client
    tmp = tempfile.mkdtemp(prefix="dirtytrack-demo-")
    os.chmod(tmp, 0o700)
    sock = os.path.join(tmp, "dirtytrack.sock")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] +
        [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    daemon = subprocess.Popen([sys.executable, "-m", "dirtytrack", "serve", "--socket", sock,
                               "--log-level", "WARNING", "--metrics-listen", ""], env=env)
    work = subprocess.Popen([sys.executable, "-m", "dirtytrack.workload", "--size", size,
                             "--rate", str(rate)], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, bufsize=1)
    try:
        _wait_for_socket(sock, daemon)
        _, pid, base, nbytes = work.stdout.readline().split()
        base, nbytes = int(base), int(nbytes)
        print(f"daemon serving on unix:{sock}; workload pid {pid} writes {rate}/s into "
              f"{nbytes >> 20} MiB", file=out)
        seen: set[int] = set()

        def note(s):
            for lo, hi in s.ranges():
                lo, hi = max(lo, base), min(hi, base + nbytes)
                seen.update(range((lo - base) // 4096, (hi - base) // 4096))

        with Client(f"unix:{sock}") as c:
            target = c.attach(int(pid)).target
            print(f"attached over gRPC: {target.target_id}, {target.mappings_tracked} mappings, "
                  f"{target.bytes_tracked >> 20} MiB tracked; `dirtytrack watch` for "
                  f"{seconds:g} s:", file=out)
            cursor = c.open_cursor(target.target_id, label="demo")
            work.stdin.write("go\n")
            work.stdin.flush()
            cursor, acked = watch(c, target.target_id, seconds, interval_ms, out=out,
                                  on_set=note, cursor_id=cursor)
            work.stdin.write("stop\n")
            work.stdin.flush()
            line = work.stdout.readline().split()
            final = c.collect(cursor, after_seq=acked)
            note(final)
        written = set()
        for run in line[1:]:
            lo, hi = map(int, run.split("-"))
            written.update(range(lo, hi))
        missed = written - seen
        print(f"{len(written)} pages written by the workload, {len(missed)} not reported: "
              f"{'every written page was reported' if not missed else 'PAGES WERE MISSED'}",
              file=out)
        return 0 if not missed else 1
    finally:
        if work.poll() is None:
            work.kill()
        work.wait()
        if daemon.poll() is None:
            daemon.terminate()
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)
