"""Every Triton kernel variant compiles ahead of time for sm_90 (H100/H200) and sm_80 (A100).

The interpreter accepts code that the compiler rejects; this is the CPU-only proof that the GPU
path builds. Compilation runs in a subprocess with TRITON_INTERPRET unset (kernels defined under
the interpreter cannot be compiled).
"""

import json
import os
import subprocess
import sys

import pytest

from proxykv.testing.compile_check import (
    PRIMARY_ARCH,
    SHARED_MEMORY_LIMIT,
    collect_specs,
    variant_group,
)

SPEC_NAMES = [spec.name for spec in collect_specs()]


@pytest.fixture(scope="module")
def compile_report(tmp_path_factory, pytestconfig):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # A fresh cache, so every variant is really compiled rather than read back from ~/.triton.
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    stderr_path = tmp_path_factory.mktemp("compile_log") / "stderr.txt"
    terminal = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    with open(stderr_path, "w+") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "proxykv.testing.compile_check"],
                                   env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        rows = []
        # Compiling every variant takes minutes: show the count as it goes, not a silent wait.
        for line in process.stdout:
            if line.startswith("{"):
                rows.append(json.loads(line))
                if terminal is not None and (len(rows) % 20 == 0):
                    terminal.write(f"[compiled {len(rows)} variants]")
        assert process.wait(timeout=1800) == 0, stderr_path.read_text()[-4000:]
    return {(row["name"], row["arch"]): row for row in rows}


def test_every_kernel_family_has_compile_specs():
    families = {name.split("[")[0] for name in SPEC_NAMES}
    assert {"attention_lse_fwd_kernel", "attention_scores_fwd_kernel",
            "aggregate_scores_fwd_kernel", "ragged_attention_fwd_kernel",
            "ragged_attention_merge_fwd_kernel"} <= families
    assert len(SPEC_NAMES) == len(set(SPEC_NAMES)), "compile spec names must be unique"


def test_every_triton_module_declares_its_kernels():
    """A triton_impl.py that defines a @triton.jit kernel lists it in COMPILE_SPECS."""
    import importlib

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    import proxykv.kernels  # noqa: F401
    from proxykv._backend import registered_ops

    declared = {spec.name.split("[")[0] for spec in collect_specs()}
    for module_name in {s.triton_launcher.split(":")[0] for s in registered_ops().values()}:
        module = importlib.import_module(module_name)
        kernels = {name for name, value in vars(module).items()
                   if isinstance(value, (JITFunction, InterpretedFunction))
                   and name.endswith("_kernel")}
        assert kernels <= declared, f"{module_name} does not declare {kernels - declared}"


def _check_row(row):
    name, arch = row["name"], row["arch"]
    assert row["ok"], row["error"]
    assert row["shared"] <= SHARED_MEMORY_LIMIT[arch], (
        f"{name} needs {row['shared']} bytes of shared memory on sm_{arch}, "
        f"the limit is {SHARED_MEMORY_LIMIT[arch]}")
    if row["uses_dot"]:
        assert row["tensor_core"], f"{name} uses tl.dot but its sm_{arch} PTX has no tensor-core op"
    assert 0 < row["registers"] <= 255 and row["spill_bytes"] >= 0, row
    assert isinstance(row["loop_instructions"], list), row


HOT_SPEC_NAMES = [spec.name for spec in collect_specs() if spec.hot]


@pytest.mark.parametrize("name", HOT_SPEC_NAMES)
def test_hot_variants_do_not_spill_on_sm90(compile_report, name):
    """A variant a launcher picks for a GPU run (the decode/question kernel, every scoring plan,
    the gathers) keeps everything in registers on sm_90."""
    row = compile_report[(name, PRIMARY_ARCH)]
    assert row["spill_bytes"] == 0, (f"{name} spills {row['spill_bytes']} bytes per thread on "
                                     f"sm_90 ({row['registers']} registers)")


def test_hot_variants_cover_every_scoring_plan_and_the_decode_kernel():
    families = {name.split("[")[0] for name in HOT_SPEC_NAMES}
    assert {"attention_lse_fwd_kernel", "attention_scores_fwd_kernel",
            "ragged_attention_fwd_kernel", "gather_kv_fwd_kernel"} <= families


@pytest.mark.parametrize("name", [spec.name for spec in collect_specs()
                                  if spec.shared_bound is not None])
def test_launchers_shared_memory_bound_holds(compile_report, name):
    """The launcher picks pipeline depths from an estimate of shared memory; the compiler must
    not allocate more than it assumed, or a plan it believes fits could fail to launch."""
    row = compile_report[(name, PRIMARY_ARCH)]
    assert row["shared"] <= row["shared_bound"], (
        f"{name} allocates {row['shared']} bytes of shared memory; the launcher assumed "
        f"{row['shared_bound']}")


# The [gpu] targets for the scoring loops (SASS instructions per warp per key or query tile):
# pass 2 <= 400, pass 1 <= 600, in the tensor-core variants the plans pick. Pass 1's unmasked
# loop comes first in the code, pass 2's last (its masked diagonal tiles come first).
INTERIOR_LOOP_TARGETS = {"attention_lse_fwd_kernel": (0, 600),
                         "attention_scores_fwd_kernel": (-1, 400)}


@pytest.mark.parametrize("family", sorted(INTERIOR_LOOP_TARGETS))
def test_scoring_interior_loops_meet_the_instruction_targets(compile_report, family):
    position, target = INTERIOR_LOOP_TARGETS[family]
    rows = [row for (name, arch), row in compile_report.items()
            if arch == PRIMARY_ARCH and name.startswith(family + "[") and row["hot"]
            and row["uses_dot"]]
    assert len(rows) >= 10, family
    over = {row["name"]: row["loop_instructions"] for row in rows
            if row["loop_instructions"][position] > target}
    assert not over, f"interior loops over {target} SASS instructions per tile: {over}"


def test_loop_instructions_are_counted(compile_report):
    """The report counts each kernel's main-loop SASS: the key-tile loops of scoring and of the
    attention over the compacted cache are found and hold hundreds of instructions."""
    for family in ("attention_lse_fwd_kernel", "attention_scores_fwd_kernel",
                   "ragged_attention_fwd_kernel"):
        rows = [row for (name, arch), row in compile_report.items()
                if arch == PRIMARY_ARCH and name.startswith(family + "[bfloat16")]
        assert rows and all(100 < row["loop_instructions"][0] < 5000 for row in rows), family


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_kernel_compiles_and_fits_on_sm90(compile_report, name):
    _check_row(compile_report[(name, PRIMARY_ARCH)])


@pytest.mark.parametrize("arch", sorted(set(SHARED_MEMORY_LIMIT) - {PRIMARY_ARCH}),
                         ids=lambda a: f"sm{a}")
def test_the_largest_variant_of_each_family_compiles_and_fits(compile_report, arch):
    rows = [row for (_, row_arch), row in compile_report.items() if row_arch == arch]
    groups = {variant_group(row["name"]) for row in rows}
    assert groups == {variant_group(name) for name in SPEC_NAMES}
    largest_on_sm90 = {}
    for (name, row_arch), row in compile_report.items():
        if row_arch == PRIMARY_ARCH:
            group = variant_group(name)
            largest_on_sm90[group] = max(largest_on_sm90.get(group, 0), row["shared"])
    for row in rows:
        assert compile_report[(row["name"], PRIMARY_ARCH)]["shared"] == \
            largest_on_sm90[variant_group(row["name"])]
        _check_row(row)
