"""Ahead-of-time compile of every Triton kernel of proxykv for real GPU targets, on any machine.

Triton's interpreter accepts code the compiler rejects, so on a CPU-only machine this is the proof
that the GPU path builds. Run as a module with ``TRITON_INTERPRET`` unset (Triton fixes the mode
when kernels are defined, and the compiler cannot run on interpreted definitions)::

    python -m proxykv.testing.compile_check [--arch 90 --arch 80]

It prints one JSON object per (kernel variant, arch) with ``ok``, ``shared`` (bytes of shared
memory), ``shared_limit``, ``tensor_core`` (whether the PTX has ``wgmma``/``mma``) and ``error``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback

# Bytes of shared memory one block may use (opt-in maximum) per compute capability.
SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
TENSOR_CORE_MARKER = {90: "wgmma", 80: "mma.sync"}


def collect_specs():
    """Every ``CompileSpec`` of every registered op's Triton module."""
    import proxykv.kernels  # noqa: F401  (registers the ops)
    from proxykv._backend import registered_ops

    modules = sorted({spec.triton_launcher.split(":")[0] for spec in registered_ops().values()})
    specs = []
    for module_name in modules:
        specs.extend(importlib.import_module(module_name).COMPILE_SPECS)
    return specs


def _jit_function(kernel):
    """Unwrap autotuner/heuristics wrappers down to the ``JITFunction``."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def compile_spec(spec, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = {"name": spec.name, "arch": arch, "uses_dot": spec.uses_dot,
              "shared_limit": SHARED_MEMORY_LIMIT[arch]}
    try:
        source = ASTSource(
            fn=_jit_function(spec.kernel),
            signature={**spec.signature, **{name: "constexpr" for name in spec.constexprs}},
            constexprs=dict(spec.constexprs),
        )
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps,
                                           "num_stages": spec.num_stages})
        ptx = compiled.asm["ptx"]
        result.update(ok=True, shared=int(compiled.metadata.shared),
                      tensor_core=TENSOR_CORE_MARKER[arch] in ptx, error=None)
    except Exception:  # noqa: BLE001 — reported to the caller as data
        result.update(ok=False, shared=None, tensor_core=False,
                      error=traceback.format_exc(limit=3)[-2000:])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_MEMORY_LIMIT))
    parser.add_argument("--name", help="compile only specs whose name contains this")
    args = parser.parse_args(argv)
    from proxykv._backend import interpreter_enabled

    if interpreter_enabled():
        print("compile_check must run with TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    for spec in collect_specs():
        if args.name and args.name not in spec.name:
            continue
        for arch in args.arch or sorted(SHARED_MEMORY_LIMIT, reverse=True):
            print(json.dumps(compile_spec(spec, arch)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
