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
memory), ``shared_limit``, ``shared_bound`` and ``hot`` (from the spec), ``registers`` (per
thread) and ``spill_bytes`` (read from the cubin with
``cuobjdump -res-usage``), ``loop_instructions`` (the SASS instructions of each innermost loop,
in code order: the cost of one tile, from ``nvdisasm``), ``tensor_core`` (whether the
PTX has ``wgmma``/``mma``) and ``error`` on stdout as each finishes, with a progress bar on
stderr. ``--markdown PATH`` also writes the report as a table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor

from proxykv.kernels._gpu import SHARED_MEMORY_BY_ARCH

# The archs compiled for, with the bytes of shared memory one block may use (opt-in maximum).
SHARED_MEMORY_LIMIT = {arch: SHARED_MEMORY_BY_ARCH[arch] for arch in (90, 80)}
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

    result = {"name": spec.name, "arch": arch, "uses_dot": spec.uses_dot, "hot": spec.hot,
              "shared_limit": SHARED_MEMORY_LIMIT[arch], "shared_bound": spec.shared_bound}
    try:
        kernel = _jit_function(spec.kernel)
        constexprs = {**spec.constexprs, **{name: 1 for name in spec.unit_strides}}
        # At launch Triton passes an int that fits in 32 bits as i32: that is the variant that
        # runs (the kernels widen their offsets to int64 themselves).
        signature = {name: "i32" if kind == "i64" else kind
                     for name, kind in spec.signature.items() if name not in spec.unit_strides}
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
                      tensor_core=TENSOR_CORE_MARKER[arch] in ptx, error=None,
                      **resource_usage(compiled.asm["cubin"]),
                      loop_instructions=inner_loop_instructions(compiled.asm["cubin"]))
    except Exception:  # noqa: BLE001 — reported to the caller as data
        result.update(ok=False, shared=None, tensor_core=False, registers=None, spill_bytes=None,
                      loop_instructions=None, error=traceback.format_exc(limit=3)[-2000:])
    return result


def _nvidia_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _run_on_cubin(arguments: list[str], cubin: bytes) -> str:
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        return subprocess.run([*arguments, handle.name], capture_output=True, text=True,
                              check=True).stdout


def inner_loop_instructions(cubin: bytes) -> list[int]:
    """SASS instructions of each innermost loop of a cubin, in code order (``nvdisasm``): a loop
    is the code from a backward branch's target up to the branch; innermost when it contains no
    other loop (the one-instruction loop that traps after the exit is left out). Each count is
    the cost of one iteration: one tile, in the scoring and attention kernels."""
    import re

    listing = _run_on_cubin([_nvidia_tool("nvdisasm"), "-c"], cubin).splitlines()
    address_of_label: dict[str, int] = {}
    instructions: list[int] = []  # addresses, in order
    loops: list[tuple[int, int]] = []
    pending: list[str] = []
    for line in listing:
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        instruction = re.match(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*)$", line)
        if not instruction:
            continue
        address = int(instruction.group(1), 16)
        for name in pending:
            address_of_label[name] = address
        pending = []
        instructions.append(address)
        branch = re.search(r"\bBRA\b.*`\((\.L_x_\d+)\)", instruction.group(2))
        if branch:
            loops.append((branch.group(1), address))
    spans = [(address_of_label[target], end) for target, end in loops
             if target in address_of_label and address_of_label[target] <= end]
    innermost = [(start, end) for start, end in spans
                 if not any(start <= s and e <= end and (s, e) != (start, end) for s, e in spans)]
    counts = [sum(start <= a <= end for a in instructions) for start, end in sorted(innermost)]
    return [count for count in counts if count > 1]


def resource_usage(cubin: bytes) -> dict:
    """``registers`` per thread and ``spill_bytes`` (the stack + local memory a thread uses:
    spills, since the kernels allocate no local arrays) of a cubin, as ``cuobjdump -res-usage``
    (shipped with Triton's NVIDIA backend) reports them."""
    import re

    report = _run_on_cubin([_nvidia_tool("cuobjdump"), "-res-usage"], cubin)
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", report)
    if match is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{report}")
    registers, stack, local = map(int, match.groups())
    return {"registers": registers, "spill_bytes": stack + local}


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
    parser.add_argument("--markdown", default=None,
                        help="also write the report as a Markdown table to this file")
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
        results = run([(index, arch) for index in chosen for arch in archs])
    else:
        results = run([(index, PRIMARY_ARCH) for index in chosen])
        sampled = set(largest_per_group(results))
        secondary = [index for index in chosen if specs[index].name in sampled]
        results += run([(index, arch) for index in secondary for arch in archs
                        if arch != PRIMARY_ARCH])
    bar.close()
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(markdown_report(results))
    return 0


def markdown_report(results: list[dict]) -> str:
    """The compile report as a Markdown table, one row per (variant, arch)."""
    lines = ["| kernel variant | arch | ok | hot | registers | spill B | shared B | limit B | "
             "tensor cores | inner loops' SASS |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["name"], -r["arch"])):
        loops = " / ".join(map(str, r.get("loop_instructions") or [])) or "—"
        lines.append(f"| `{r['name']}` | sm_{r['arch']} | {'yes' if r['ok'] else 'NO'} | "
                     f"{'yes' if r['hot'] else ''} | "
                     f"{r.get('registers', '—')} | {r.get('spill_bytes', '—')} | "
                     f"{r.get('shared', '—')} | {r['shared_limit']} | "
                     f"{'yes' if r.get('tensor_core') else ('—' if not r['uses_dot'] else 'NO')} | "
                     f"{loops} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
