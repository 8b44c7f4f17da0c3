"""Fill fresh ``torch.empty*`` allocations with a poison value so unwritten output is caught."""

from __future__ import annotations

import contextlib

import torch

_ALLOCATORS = ("empty", "empty_like", "empty_strided")


def _poison(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point() or tensor.is_complex():
        tensor.fill_(float("nan"))
    elif tensor.dtype == torch.bool:
        tensor.fill_(True)
    else:
        tensor.fill_(torch.iinfo(tensor.dtype).min)
    return tensor


@contextlib.contextmanager
def poison_empty_allocations():
    """Within the block, ``torch.empty``, ``torch.empty_like`` and ``torch.empty_strided`` return
    tensors filled with NaN (floats), ``True`` (bool) or the dtype's minimum (ints).

    A kernel that forgets to write an output element then leaves a NaN that ``assert_close`` flags.
    """
    originals = {name: getattr(torch, name) for name in _ALLOCATORS}

    def poisoning(original):
        def allocate(*args, **kwargs):
            return _poison(original(*args, **kwargs))
        return allocate

    try:
        for name, original in originals.items():
            setattr(torch, name, poisoning(original))
        yield
    finally:
        for name, original in originals.items():
            setattr(torch, name, original)
