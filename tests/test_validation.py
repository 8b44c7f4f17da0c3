"""Messages of the shared validation helpers (every op's api.py uses them)."""

import pytest
import torch

from proxykv._validation import (
    check_choice,
    check_gqa,
    check_indices,
    check_int,
    check_same_device,
    check_same_dtype,
    check_scale,
    check_tensor,
)


def test_rank_message_names_the_layout():
    with pytest.raises(ValueError, match=r"^k must be a 4-D tensor \[B, H_kv, T, D\], got shape "
                                         r"\(2, 3, 5\)$"):
        check_tensor("k", torch.zeros(2, 3, 5), ndim=4, layout="[B, H_kv, T, D]")


def test_dtype_message_lists_what_is_accepted():
    with pytest.raises(TypeError, match=r"^q must be float16, bfloat16 or float32, got torch.int64$"):
        check_tensor("q", torch.zeros(2, dtype=torch.int64),
                     dtypes=(torch.float16, torch.bfloat16, torch.float32))


def test_device_mismatch_names_both_devices():
    with pytest.raises(ValueError, match=r"^q and k must be on the same device, got cpu and meta$"):
        check_same_device(q=torch.zeros(1), k=torch.zeros(1, device="meta"))
    assert check_same_device(q=torch.zeros(1), k=None) == torch.device("cpu")


def test_device_check_refuses_meta_and_non_tensors():
    with pytest.raises(ValueError, match=r"^q must be on a CPU or CUDA device, got meta$"):
        check_same_device(q=torch.zeros(1, device="meta"), k=torch.zeros(1, device="meta"))
    with pytest.raises(TypeError, match=r"^key_valid_len must be a torch.Tensor, got list$"):
        check_same_device(q=torch.zeros(1), key_valid_len=[3])


def test_scale_rule():
    assert check_scale(None, 16) == 0.25
    assert check_scale(2, 16) == 2.0
    with pytest.raises(TypeError, match=r"^scale must be a float, got str 'x'$"):
        check_scale("x", 16)
    with pytest.raises(TypeError, match=r"^scale must be a float, got bool True$"):
        check_scale(True, 16)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^scale must be a finite float > 0 "):
            check_scale(bad, 16)


def test_dtype_mismatch():
    with pytest.raises(TypeError, match="k and v must have the same dtype, got torch.float16 and "
                                        "torch.float32"):
        check_same_dtype(k=torch.zeros(1, dtype=torch.float16), v=torch.zeros(1))


def test_gqa_divisibility():
    assert check_gqa(8, 2) == 4
    with pytest.raises(ValueError, match="H_q=6 must be a multiple of the number of KV heads "
                                         "H_kv=4"):
        check_gqa(6, 4)


def test_choice_and_int():
    with pytest.raises(ValueError, match="reduce must be one of 'mean', 'sum' or 'max', got 'min'"):
        check_choice("reduce", "min", ("mean", "sum", "max"))
    with pytest.raises(TypeError, match="window must be an int, got bool True"):
        check_int("window", True)
    with pytest.raises(ValueError, match="window must be <= 4, got 5"):
        check_int("window", 5, maximum=4)


def test_indices_dtype_range_and_order():
    with pytest.raises(TypeError, match="indices must be int32 or int64, got torch.float32"):
        check_indices("indices", torch.zeros(3), upper=5)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\), got values in \[-1, 2\]"):
        check_indices("indices", torch.tensor([-1, 2]), upper=5)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\), got values in \[0, 5\]"):
        check_indices("indices", torch.tensor([0, 5]), upper=5)
    with pytest.raises(ValueError, match="strictly increasing along its last dimension"):
        check_indices("indices", torch.tensor([[0, 2, 2]]), upper=5, sorted_last_dim=True)
    check_indices("indices", torch.tensor([[0, 2, 4], [1, 2, 3]], dtype=torch.int32), upper=5,
                  sorted_last_dim=True)
