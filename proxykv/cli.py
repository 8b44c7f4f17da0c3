"""The ``proxykv`` command line."""

from __future__ import annotations

import argparse
import sys


def _selfcheck(args: argparse.Namespace) -> int:
    import os

    if args.device == "cpu" and args.interpret:
        # Must happen before any Triton kernel is defined; proxykv defines them lazily.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import proxykv
    from proxykv.selfcheck import run_selfcheck

    print(f"proxykv {proxykv.__version__} selfcheck on {args.device}"
          f" (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')})")
    checks = run_selfcheck(args.device)
    width = max(len(c.op) for c in checks)
    for check in checks:
        status = "ok" if check.ok else "MISMATCH"
        print(f"  {check.op:<{width}}  impl={check.impl:<6}  max|err|={check.max_abs_error:.2e}  "
              f"{check.seconds * 1e3:8.1f} ms  {status}   ({check.reason})")
    failed = [c.op for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)}/{len(checks)} checks agree with the reference")
    return 1 if failed else 0


def _backends(args: argparse.Namespace) -> int:
    from proxykv import backend_info

    for op, choice in backend_info(args.device).items():
        print(f"{op}: {choice.impl} ({choice.reason})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="proxykv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    selfcheck = commands.add_parser(
        "selfcheck", help="run every op on small inputs and compare with its reference")
    selfcheck.add_argument("--device", default="cpu")
    selfcheck.add_argument(
        "--no-interpret", dest="interpret", action="store_false",
        help="on CPU, check only the torch implementations (default: also run the Triton kernels "
             "under the interpreter)")
    selfcheck.set_defaults(handler=_selfcheck)
    backends = commands.add_parser("backends", help="which backend each op uses here, and why")
    backends.add_argument("--device", default=None)
    backends.set_defaults(handler=_backends)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
