"""Selection: the layout contract between policies and gather kernels."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from proxykv.selection import Selection


@st.composite
def masks(draw):
    b, l, h, t = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3)),
                  draw(st.integers(1, 40)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    density = draw(st.sampled_from([0.0, 0.3, 1.0]))
    return torch.rand(b, l, h, t, generator=generator) < density


@given(mask=masks())
def test_mask_round_trips_through_both_forms(mask):
    selection = Selection.from_mask(mask)
    selection.validate()
    assert torch.equal(selection.to_mask(), mask)
    ragged = selection.to_ragged()
    ragged.validate()
    assert ragged.is_ragged and torch.equal(ragged.to_mask(), mask)
    assert torch.equal(selection.counts(), mask.sum(-1))
    assert ragged.total_kept == int(mask.sum())


@given(mask=masks(), data=st.data())
def test_layer_view_matches_the_layer_of_the_mask(mask, data):
    selection = Selection.from_mask(mask).to_ragged()
    layer = data.draw(st.integers(0, mask.shape[1] - 1))
    view = selection.layer(layer)
    b, _, h, _ = mask.shape
    assert view.cu_seqlens.numel() == b * h + 1 and int(view.cu_seqlens[0]) == 0
    for batch in range(b):
        for head in range(h):
            s = batch * h + head
            kept = view.indices[view.cu_seqlens[s]:view.cu_seqlens[s + 1]].long()
            assert torch.equal(kept, mask[batch, layer, head].nonzero().flatten())


def test_equal_counts_give_a_uniform_selection():
    mask = torch.zeros(2, 1, 2, 6, dtype=torch.bool)
    mask[..., [1, 4]] = True
    selection = Selection.from_mask(mask)
    assert not selection.is_ragged and selection.indices.shape == (2, 1, 2, 2)
    assert selection.indices.dtype == torch.int32 and selection.budget == 2.0
    assert selection.layer(0).indices.tolist() == [[[1, 4], [1, 4]], [[1, 4], [1, 4]]]


def test_uniform_constructor_sorts():
    selection = Selection.uniform(torch.tensor([[[[5, 1, 3]]]]), seq_len=6)
    assert selection.indices.tolist() == [[[[1, 3, 5]]]]
    assert selection.indices.dtype == torch.int32 and selection.budget == 3.0
    with pytest.raises(ValueError, match=r"layer_index must be in \[0, 1\), got 1"):
        selection.layer(1)


@pytest.mark.parametrize("indices, seq_len, error, message", [
    pytest.param(torch.tensor([[[[1.7, 3.2]]]]), 6, TypeError,
                 "indices must be int32 or int64, got torch.float32", id="float"),
    pytest.param([[[[1, 3]]]], 6, TypeError, "indices must be a torch.Tensor, got list",
                 id="list"),
    pytest.param(torch.tensor([[[1, 3]]]), 6, ValueError,
                 r"indices must be a 4-D tensor \[B, L, H_kv, k\], got shape \(1, 1, 2\)",
                 id="rank"),
    pytest.param(torch.tensor([[[[1, 6]]]]), 6, ValueError,
                 r"indices must lie in \[0, 6\), got values in \[1, 6\]", id="past-T"),
    pytest.param(torch.tensor([[[[-1, 2]]]]), 6, ValueError,
                 r"indices must lie in \[0, 6\), got values in \[-1, 2\]", id="negative"),
    pytest.param(torch.tensor([[[[2**32 + 1, 2]]]]), 6, ValueError,
                 r"indices must lie in \[0, 6\)", id="past-int32"),
    pytest.param(torch.tensor([[[[3, 1, 3]]]]), 6, ValueError,
                 "indices must be strictly increasing within each head", id="repeat"),
    pytest.param(torch.zeros(0, 1, 2, 1, dtype=torch.int64), 6, ValueError,
                 r"indices must have B, L, H_kv >= 1, got shape \(0, 1, 2, 1\)", id="empty-B"),
    pytest.param(torch.tensor([[[[1, 3]]]]), 0, ValueError, "seq_len must be >= 1, got 0",
                 id="seq_len-0"),
    pytest.param(torch.tensor([[[[1, 3]]]]), 6.0, TypeError, "seq_len must be an int, got float",
                 id="seq_len-float"),
    pytest.param(torch.tensor([[[[1, 3]]]], device="meta"), 6, ValueError,
                 "indices must be on a CPU or CUDA device, got meta", id="meta"),
])
def test_uniform_constructor_checks_its_indices(indices, seq_len, error, message):
    with pytest.raises(error, match=message):
        Selection.uniform(indices, seq_len=seq_len)


def test_uniform_constructor_keeps_an_empty_selection():
    selection = Selection.uniform(torch.zeros(1, 2, 1, 0, dtype=torch.int32), seq_len=4)
    assert selection.counts().tolist() == [[[0], [0]]]
    selection.validate()


@pytest.mark.parametrize("mask, error, message", [
    pytest.param([[[[True]]]], TypeError, "mask must be a torch.Tensor, got list", id="list"),
    pytest.param(torch.ones(1, 1, 1, 4), TypeError, "mask must be bool, got torch.float32",
                 id="float"),
    pytest.param(torch.ones(1, 1, 4, dtype=torch.bool), ValueError,
                 r"mask must be a 4-D tensor \[B, L, H_kv, T\], got shape \(1, 1, 4\)",
                 id="rank"),
    pytest.param(torch.ones(1, 0, 1, 4, dtype=torch.bool), ValueError,
                 r"mask must have B, L, H_kv, T >= 1, got shape \(1, 0, 1, 4\)", id="empty-L"),
    pytest.param(torch.ones(1, 1, 1, 0, dtype=torch.bool), ValueError,
                 r"mask must have B, L, H_kv, T >= 1", id="empty-T"),
    pytest.param(torch.ones(1, 1, 1, 4, dtype=torch.bool, device="meta"), ValueError,
                 "mask must be on a CPU or CUDA device, got meta", id="meta"),
])
def test_from_mask_checks_its_mask(mask, error, message):
    with pytest.raises(error, match=message):
        Selection.from_mask(mask)


def test_ragged_constructor_checks_at_construction():
    def ragged(indices, cu_seqlens, seq_len=6, dtype=torch.int32):
        return Selection.ragged(torch.tensor(indices, dtype=dtype),
                                torch.tensor(cu_seqlens, dtype=dtype), shape=(1, 1, 2, seq_len))

    good = ragged([1, 4, 0], [0, 2, 3], dtype=torch.int64)
    assert good.indices.dtype == torch.int32 and good.cu_seqlens.dtype == torch.int32
    assert good.counts().tolist() == [[[2, 1]]] and good.budget == 1.5
    assert ragged([], [0, 0, 0]).total_kept == 0
    with pytest.raises(ValueError, match=r"must start at 0"):
        ragged([1, 4, 0], [1, 2, 3])
    with pytest.raises(ValueError, match=r"must end at N"):
        ragged([1, 4, 0], [0, 2, 2])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 6\), got values in \[0, 6\]"):
        ragged([1, 6, 0], [0, 2, 3])
    with pytest.raises(ValueError, match="strictly increasing within each head"):
        ragged([4, 1, 0], [0, 2, 3])
    with pytest.raises(ValueError, match=r"cu_seqlens must be a 1-D tensor \[L \* B \* H_kv \+ 1\]"
                                         r" of 3 entries, got shape \(2,\)"):
        ragged([1, 4, 0], [0, 3])
    with pytest.raises(TypeError, match="indices must be int32 or int64, got torch.float32"):
        Selection.ragged(torch.tensor([1.0]), torch.tensor([0, 1, 1]), shape=(1, 1, 2, 6))
    with pytest.raises(ValueError, match="indices and cu_seqlens must be on the same device"):
        Selection.ragged(torch.tensor([1]), torch.tensor([0, 1, 1], device="meta"),
                         shape=(1, 1, 2, 6))


def test_validate_checks_ragged_bounds_range_and_order():
    def ragged(indices, cu_seqlens, seq_len=6):
        return Selection(torch.tensor(indices, dtype=torch.int32),
                         torch.tensor(cu_seqlens, dtype=torch.int32), 1, 1, 2, seq_len, 1.0)

    ragged([1, 4, 0], [0, 2, 3]).validate()
    ragged([], [0, 0, 0]).validate()
    with pytest.raises(ValueError, match=r"rise monotonically from 0 to N=3: .*must start at 0"):
        ragged([1, 4, 0], [1, 2, 3]).validate()
    with pytest.raises(ValueError, match=r"rise monotonically from 0 to N=3: .*non-decreasing"):
        ragged([1, 4, 0], [0, 4, 3]).validate()
    with pytest.raises(ValueError, match=r"rise monotonically from 0 to N=3: .*must end at N"):
        ragged([1, 4, 0], [0, 2, 2]).validate()
    with pytest.raises(ValueError, match=r"must lie in \[0, 6\), got values in \[0, 6\]"):
        ragged([1, 6, 0], [0, 2, 3]).validate()
    with pytest.raises(ValueError, match="strictly increasing within each head"):
        ragged([4, 1, 0], [0, 2, 3]).validate()
    with pytest.raises(ValueError, match="strictly increasing within each head"):
        ragged([0, 4, 1], [0, 0, 3]).validate()  # sorted across, not within, the last segment
