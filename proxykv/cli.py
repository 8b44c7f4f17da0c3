"""The ``proxykv`` command line: a thin shell over library functions that tests call directly.

Bad arguments end in one line on stderr and exit code 2 (argparse's convention), never a
traceback.
"""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = ("proxykv: Triton kernels and policies for cross-model proxy KV-cache pruning. "
               "'proxykv COMMAND --help' lists a command's options.")


class _Parser(argparse.ArgumentParser):
    """Reports a usage error on one line (with where to find help), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class UsageError(Exception):
    """A command-line argument that cannot be used here; reported as ``proxykv: error: ...``."""


def _device(text: str):
    """argparse type of ``--device``: a torch device of a type proxykv runs on."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: proxykv runs on cpu or cuda devices")
    return device


def _require_available(device) -> None:
    import torch

    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine "
                         f"(torch {torch.__version__})")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                         "CUDA device(s)")


def _selfcheck(args: argparse.Namespace) -> int:
    import os

    _require_available(args.device)
    if args.device.type == "cpu" and args.interpret:
        # Must happen before any Triton kernel is defined; proxykv defines them lazily.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import proxykv
    from proxykv.selfcheck import run_selfcheck

    print(f"proxykv {proxykv.__version__} selfcheck on {args.device}"
          f" (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')})")
    checks = run_selfcheck(args.device)
    width = max(len(c.name) for c in checks)
    for check in checks:
        status = "ok" if check.ok else "MISMATCH"
        print(f"  {check.name:<{width}}  impl={check.impl:<6}  max|err|={check.max_abs_error:.2e}  "
              f"{check.seconds * 1e3:8.1f} ms  {status}   ({check.reason})")
    failed = [c.name for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)}/{len(checks)} checks agree with the reference")
    return 1 if failed else 0


def _backends(args: argparse.Namespace) -> int:
    from proxykv import backend_info

    if args.device is not None:
        _require_available(args.device)
    for op, choice in backend_info(args.device).items():
        print(f"{op}: {choice.impl} ({choice.reason})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from proxykv import __version__

    parser = _Parser(prog="proxykv", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"proxykv {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     title="commands")
    device_help = "cpu, cuda or cuda:N (default: %(default)s)"

    selfcheck = commands.add_parser(
        "selfcheck", help="compare every op, policy, the ragged cache and the axial aligner with "
                          "their references on small inputs (on CPU: torch, and Triton under its "
                          "interpreter)",
        description="Run every kernel op, every built-in policy, the ragged KV cache and the axial "
                    "aligner on small inputs and compare each with its reference. Exit code 1 "
                    "if any disagrees.")
    selfcheck.add_argument("--device", type=_device, default="cpu", help=device_help)
    selfcheck.add_argument(
        "--no-interpret", dest="interpret", action="store_false",
        help="on CPU, check only the torch implementations (default: also run the Triton kernels "
             "under the interpreter)")
    selfcheck.set_defaults(handler=_selfcheck)

    backends = commands.add_parser(
        "backends", help="which backend (Triton or torch) each op uses on a device, and why",
        description="Which backend (Triton or torch) each op runs with impl=None on a device, "
                    "and why.")
    backends.add_argument("--device", type=_device, default=None,
                          help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    backends.set_defaults(handler=_backends)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UsageError as error:
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
