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
    from dirtytrack.demo import run
    return run(parse_size(args.size), args.seconds, args.interval, args.rate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dirtytrack",
        description="Track which memory pages of running processes were written.")
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help="check that this machine can track writes")
    doctor.set_defaults(func=cmd_doctor)
    demo = sub.add_parser("demo", help="track a buffer being written, live, and verify it")
    demo.add_argument("--size", default="256M", help="buffer size (default 256M)")
    demo.add_argument("--seconds", type=float, default=10.0, help="how long (default 10)")
    demo.add_argument("--interval", type=float, default=0.5,
                      help="seconds between collects (default 0.5)")
    demo.add_argument("--rate", type=int, default=20000,
                      help="writes per second the writer aims at (default 20000)")
    demo.set_defaults(func=cmd_demo)
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
