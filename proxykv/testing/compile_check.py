"""Ahead-of-time compile of every Triton kernel of proxykv for real GPU targets, on any machine.

Triton's interpreter accepts code the compiler rejects, so on a CPU-only machine this is the proof
that the GPU path builds. Run as a module with ``TRITON_INTERPRET`` unset (Triton fixes the mode
when kernels are defined, and the compiler cannot run on interpreted definitions)::

    python -m proxykv.testing.compile_check [--arch 90 --arch 80] [--jobs N]

It prints one JSON object per (kernel variant, arch) with ``ok``, ``shared`` (bytes of shared
memory), ``shared_limit``, ``tensor_core`` (whether the PTX has ``wgmma``/``mma``) and ``error``
on stdout, and a progress line per variant (``[k/n] name sm_90 ok``) on stderr, as each finishes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor

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
        kernel = _jit_function(spec.kernel)
        constexprs = {**spec.constexprs, **{name: 1 for name in spec.unit_strides}}
        signature = {name: kind for name, kind in spec.signature.items()
                     if name not in spec.unit_strides}
        aligned = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
                   for name, kind in signature.items()
                   if kind.startswith("*") or name.startswith("stride")}
        source = ASTSource(fn=kernel,
                           signature={**signature, **{name: "constexpr" for name in constexprs}},
                           constexprs=constexprs, attrs=aligned)
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


def _compile_by_index(job: tuple[int, int]) -> dict:
    index, arch = job
    return compile_spec(collect_specs()[index], arch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_MEMORY_LIMIT))
    parser.add_argument("--name", help="compile only specs whose name contains this")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiler processes (default: one per core)")
    args = parser.parse_args(argv)
    from proxykv._backend import interpreter_enabled

    if interpreter_enabled():
        print("compile_check must run with TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    specs = collect_specs()
    jobs = [(index, arch) for index, spec in enumerate(specs)
            if not args.name or args.name in spec.name
            for arch in args.arch or sorted(SHARED_MEMORY_LIMIT, reverse=True)]
    if args.jobs <= 1:
        results = map(_compile_by_index, jobs)
    else:
        results = ProcessPoolExecutor(max_workers=args.jobs).map(_compile_by_index, jobs)
    for done, result in enumerate(results, 1):
        print(json.dumps(result), flush=True)
        status = "ok" if result["ok"] else "FAILED"
        print(f"[{done}/{len(jobs)}] {result['name']} sm_{result['arch']} {status}",
              file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
