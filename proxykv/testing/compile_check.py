"""Ahead-of-time compile of every Triton kernel of proxykv for real GPU targets, on any machine.

Triton's interpreter accepts code the compiler rejects, so on a CPU-only machine this is the proof
that the GPU path builds. Run as a module with ``TRITON_INTERPRET`` unset (Triton fixes the mode
when kernels are defined, and the compiler cannot run on interpreted definitions)::

    python -m proxykv.testing.compile_check [--arch 90 --arch 80] [--all-archs] [--jobs N]

sm_90 (H100/H200, the target) compiles every variant. To keep the check to about a minute on two
cores, the other archs by default compile one variant per kernel family and dtype: the one that
needs the most shared memory on sm_90 — the one that could pass sm_80's smaller limit
(``--all-archs`` compiles everything everywhere).

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


PRIMARY_ARCH = 90
DTYPE_NAMES = ("float16", "bfloat16", "float32")


def variant_group(name: str) -> tuple[str, str]:
    """(kernel family, dtype) of a spec name, the unit the secondary archs sample from."""
    dtype = next((d for d in DTYPE_NAMES if d in name.split("[", 1)[-1].split(",")), "")
    return name.split("[")[0], dtype


def largest_per_group(results: list[dict]) -> list[str]:
    """Names of the variant with the most shared memory in each (family, dtype) group."""
    best: dict[tuple[str, str], dict] = {}
    for result in results:
        if not result["ok"]:
            continue
        group = variant_group(result["name"])
        if group not in best or result["shared"] > best[group]["shared"]:
            best[group] = result
    return [result["name"] for result in best.values()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_MEMORY_LIMIT))
    parser.add_argument("--name", help="compile only specs whose name contains this")
    parser.add_argument("--all-archs", action="store_true",
                        help="compile every variant for every arch (default: every variant for "
                             "sm_90, the largest of each kernel family and dtype for the others)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiler processes (default: one per core)")
    args = parser.parse_args(argv)
    from proxykv._backend import interpreter_enabled

    if interpreter_enabled():
        print("compile_check must run with TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    specs = collect_specs()
    chosen = [index for index, spec in enumerate(specs) if not args.name or args.name in spec.name]
    archs = args.arch or sorted(SHARED_MEMORY_LIMIT, reverse=True)
    pool = ProcessPoolExecutor(max_workers=args.jobs) if args.jobs > 1 else None
    from tqdm.auto import tqdm

    bar = tqdm(desc="compile", unit="variant", file=sys.stderr, mininterval=2.0)

    def run(jobs: list[tuple[int, int]]) -> list[dict]:
        results = []
        bar.total = (bar.total or 0) + len(jobs)
        for result in (pool.map if pool else map)(_compile_by_index, jobs):
            results.append(result)
            print(json.dumps(result), flush=True)
            bar.update(1)
            bar.set_postfix_str(f"{result['name']} sm_{result['arch']} "
                                f"{'ok' if result['ok'] else 'FAILED'}", refresh=False)
        return results

    if args.all_archs or PRIMARY_ARCH not in archs:
        run([(index, arch) for index in chosen for arch in archs])
    else:
        primary = run([(index, PRIMARY_ARCH) for index in chosen])
        sampled = set(largest_per_group(primary))
        secondary = [index for index in chosen if specs[index].name in sampled]
        run([(index, arch) for index in secondary for arch in archs if arch != PRIMARY_ARCH])
    bar.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
