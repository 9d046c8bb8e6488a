"""The `dirtytrack` command."""
from __future__ import annotations

import argparse
import os
import sys


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().rstrip("ib")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def cmd_doctor(args) -> int:
    from dirtytrack.doctor import report, run_checks
    return 0 if report(run_checks(), sys.stdout) else 1


def cmd_demo(args) -> int:
    from dirtytrack.doctor import report, run_checks
    checks = run_checks()
    if not report(checks, sys.stdout):
        return 1
    print()
    if args.in_process:
        from dirtytrack.demo import run
        return run(parse_size(args.size), args.seconds, args.interval, args.rate)
    from dirtytrack.daemon.commands import run_demo
    return run_demo(args.size, args.seconds, int(args.interval * 1000), args.rate)


def _daemon(name):
    def run(args):
        from dirtytrack.daemon import commands
        return getattr(commands, name)(args)
    return run


def _client_options(p) -> None:
    p.add_argument("--socket", help="the daemon's Unix socket (default "
                   "/run/dirtytrack/dirtytrack.sock, or $DIRTYTRACK_ADDRESS)")
    p.add_argument("--address", help="a gRPC address instead (host:port, unix:PATH)")
    p.add_argument("--tls-ca", help="CA to verify a TCP daemon's certificate (enables TLS)")
    p.add_argument("--tls-cert", help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", help="client key (mutual TLS)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dirtytrack",
        description="Track which memory pages of running processes were written.")
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help="check that this machine can track writes")
    doctor.set_defaults(func=cmd_doctor)
    demo = sub.add_parser("demo", help="start the daemon, a demo workload, and watch it live "
                          "(checked against the workload's own log)")
    demo.add_argument("--size", default="256M", help="buffer size (default 256M)")
    demo.add_argument("--seconds", type=float, default=10.0, help="how long (default 10)")
    demo.add_argument("--interval", type=float, default=0.5,
                      help="seconds between collects (default 0.5)")
    demo.add_argument("--rate", type=int, default=20000,
                      help="writes per second the writer aims at (default 20000)")
    demo.add_argument("--in-process", action="store_true",
                      help="no daemon: track a buffer of this process (the library alone)")
    demo.set_defaults(func=cmd_demo)

    serve = sub.add_parser("serve", help="run the daemon (gRPC; flags > DIRTYTRACK_* env > "
                           "TOML config > defaults)")
    serve.add_argument("--config", help="TOML file (default $DIRTYTRACK_CONFIG or "
                       "/etc/dirtytrack/dirtytrack.toml)")
    serve.add_argument("--socket", help="Unix socket path (default "
                       "/run/dirtytrack/dirtytrack.sock; mode 0600 in a 0700 directory)")
    serve.add_argument("--no-socket", action="store_true", help="TCP only")
    serve.add_argument("--listen", help="also serve TCP on HOST:PORT (TLS required)")
    serve.add_argument("--tls-cert", help="PEM certificate chain for --listen")
    serve.add_argument("--tls-key", help="PEM private key for --listen")
    serve.add_argument("--tls-client-ca", help="require client certificates signed by this CA")
    serve.add_argument("--insecure-tcp", action="store_true",
                       help="allow --listen without TLS (trusted networks only)")
    serve.add_argument("--interval-ms", type=int, help="default scan interval (1000)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING (INFO)")
    serve.add_argument("--metrics-listen", help="Prometheus /metrics on HOST:PORT "
                       "(default 127.0.0.1:9476; \"\" disables)")
    serve.add_argument("--health-listen", help="plain-TCP HOST:PORT serving only the gRPC "
                       "health service (Kubernetes grpc probes; default off)")
    serve.set_defaults(func=_daemon("cmd_serve"))

    attach = sub.add_parser("attach", help="have the daemon track a process")
    attach.add_argument("pid", type=int)
    attach.add_argument("--name", action="append", default=[],
                        help="also track mappings whose name matches this glob")
    attach.add_argument("--range", action="append", default=[],
                        help="also track START-END (addresses, 0x... allowed)")
    attach.add_argument("--no-default", action="store_true",
                        help="track only --name and --range selections")
    attach.set_defaults(func=_daemon("cmd_attach"))
    for name, helptext in (("detach", "stop tracking a target"),
                           ("describe", "show a target in detail")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("target", help="target id or pid")
        p.set_defaults(func=_daemon(f"cmd_{name}"))
        _client_options(p)
    _client_options(attach)
    targets = sub.add_parser("targets", help="list tracked targets")
    targets.set_defaults(func=_daemon("cmd_targets"))
    _client_options(targets)
    collect = sub.add_parser("collect", help="pages written in a target (through a cursor)")
    collect.add_argument("target", help="target id or pid")
    collect.add_argument("--cursor", help="continue this cursor (default: open one)")
    collect.add_argument("--after", type=int, default=0,
                         help="the last set you received from --cursor")
    collect.add_argument("--wait", type=float, default=1.0,
                         help="with a new cursor, seconds to wait before collecting (1)")
    collect.add_argument("--limit", type=int, default=20, help="ranges to print (20)")
    collect.set_defaults(func=_daemon("cmd_collect"))
    _client_options(collect)
    watch = sub.add_parser("watch", help="live dirty pages/s and bytes/s of a target")
    watch.add_argument("target", help="target id or pid")
    watch.add_argument("--seconds", type=float, default=float("inf"), help="stop after (never)")
    watch.add_argument("--interval-ms", type=int, default=500, help="between sets (500)")
    watch.set_defaults(func=_daemon("cmd_watch"))
    _client_options(watch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` and closed: not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
