"""What the launch plans need to know about the GPU a kernel will run on.

The host knows both figures before any launch; they are read once per device from the driver.
Off a GPU (the interpreter, the compile check, launch-shape tests) the plans assume an H100.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GpuLimits:
    """``sm_count``: streaming multiprocessors; ``shared_memory``: bytes of shared memory one block
    may use (the opt-in maximum)."""

    sm_count: int
    shared_memory: int


#: opt-in shared memory per block by compute capability (``major * 10 + minor``)
SHARED_MEMORY_BY_ARCH = {90: 227 * 1024, 80: 163 * 1024, 87: 163 * 1024}
_SMALLEST_SHARED_MEMORY = 99 * 1024  # sm_86/sm_89/sm_120
H100 = GpuLimits(sm_count=132, shared_memory=SHARED_MEMORY_BY_ARCH[90])
# Busy programs per SM that fill a GPU several times over at batch 1: the launch plans split work
# until they have this many per SM.
PROGRAMS_PER_SM = 4


@functools.lru_cache(maxsize=None)
def _limits_of(index: int) -> GpuLimits:
    properties = torch.cuda.get_device_properties(index)
    # The table covers a torch that does not report the opt-in limit.
    shared = getattr(properties, "shared_memory_per_block_optin", None) or \
        SHARED_MEMORY_BY_ARCH.get(10 * properties.major + properties.minor,
                                  _SMALLEST_SHARED_MEMORY)
    return GpuLimits(sm_count=properties.multi_processor_count, shared_memory=int(shared))


def gpu_limits(device: torch.device | None) -> GpuLimits:
    """The limits of ``device`` when it is a CUDA device, else an H100's."""
    if device is None or device.type != "cuda":
        return H100
    return _limits_of(device.index if device.index is not None else torch.cuda.current_device())
