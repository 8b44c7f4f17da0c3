"""What the ahead-of-time compile check needs to know about each Triton kernel.

Every ``triton_impl.py`` lists its kernels' variants (each dtype, each autotune config) as
``COMPILE_SPECS``; ``proxykv.testing.compile_check`` compiles them all for sm_90 and sm_80.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CompileSpec:
    """One compilable variant of a kernel.

    ``signature`` maps every non-constexpr argument to a Triton type (``"*fp16"``, ``"i32"``,
    ``"i64"``, ``"fp32"``); ``constexprs`` gives every ``tl.constexpr`` argument a value.
    ``uses_dot`` marks kernels whose inner loop is a ``tl.dot`` and must emit tensor-core code.

    The check compiles the variant Triton builds at run time for the usual, aligned call: every
    pointer and every argument named ``stride_*`` is marked divisible by 16, ints declared
    ``"i64"`` are passed as ``i32`` (Triton does so for every value below 2**31), and the
    arguments in ``unit_strides`` (the innermost stride of a contiguous head dim) are
    specialised to 1. That variant vectorises and pipelines the most, so it also needs the most
    shared memory.

    ``hot`` marks a variant a launcher picks for a GPU run by default: it must not spill
    registers on sm_90. ``shared_bound`` is the shared memory the launcher assumed when it chose
    the variant's pipeline depth; the compiled kernel must not need more.
    """

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    uses_dot: bool = False
    unit_strides: tuple[str, ...] = ()
    hot: bool = False
    shared_bound: int | None = None


TRITON_POINTER_TYPES = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32",
                        "int32": "*i32", "int64": "*i64"}
