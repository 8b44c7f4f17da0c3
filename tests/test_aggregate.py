"""Score aggregation: reduce_heads, normalize_scores, the fused aggregate_scores and combine_layers.

Triton (interpreted or compiled), torch and the dispatcher are compared with the float64 oracles
of ``proxykv.kernels.aggregate.reference``; the fused op is also compared with the chain of the
separate ops run by the same backend. Small tiles (``MAX_BLOCK_T=16``) make pooling windows and
row statistics cross tile borders on interpreter-sized inputs.
"""

from contextlib import ExitStack, contextmanager
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import proxykv.kernels.aggregate.torch_impl as aggregate_torch
import proxykv.kernels.aggregate.triton_impl as aggregate_triton
from proxykv.kernels import pool_scores
from proxykv.kernels.aggregate import (
    aggregate_scores,
    combine_layers,
    normalize_scores,
    reduce_heads,
)
from proxykv.kernels.aggregate.reference import (
    aggregate_scores_reference,
    combine_layers_reference,
    normalize_scores_reference,
    reduce_heads_reference,
)
from proxykv.testing import assert_close
from proxykv.testing import strategies as pst

NEG_INF = float("-inf")
POS_INF = float("inf")
IMPLS = ["torch", "triton", None]

# (impl, tiles): "small" shrinks the Triton tiles (16 positions, partials folded 4 at a time) so
# windows, row statistics and the partial-fold loop all cross tile borders, and the torch
# combine_layers chunks to 7 positions.
BACKENDS = [
    pytest.param("torch", "default", id="torch"),
    pytest.param("triton", "default", id="triton"),
    pytest.param("triton", "small", id="triton-small-tiles"),
    pytest.param(None, "default", id="impl=None"),
]
COMBINE_BACKENDS = [*BACKENDS, pytest.param("torch", "small", id="torch-small-chunks")]
# Interpreted programs are slow: with 16-position tiles, shorter rows still span many tiles.
MAX_LENGTH = {"default": 200, "small": 90}


@contextmanager
def tiles(size: str):
    with ExitStack() as stack:
        if size == "small":
            stack.enter_context(mock.patch.object(aggregate_triton, "MAX_BLOCK_T", 16))
            stack.enter_context(mock.patch.object(aggregate_triton, "BLOCK_TILES", 4))
            stack.enter_context(mock.patch.object(aggregate_torch, "COMBINE_CHUNK", 7))
        yield


def _invalidate(draw, scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Add the -inf patterns that matter: positions invalid for a whole group, for one head only,
    and fully invalid rows."""
    scores = scores.clone()
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    length = scores.shape[-1]
    heads = scores.shape[-2]
    if draw(st.booleans()):  # a span of positions invalid for every head of one group
        group = int(torch.randint(heads // group_size, (1,), generator=generator))
        start = int(torch.randint(length, (1,), generator=generator))
        scores[..., group * group_size:(group + 1) * group_size, start:start + 9] = NEG_INF
    if draw(st.booleans()):  # a span invalid for a single head
        head = int(torch.randint(heads, (1,), generator=generator))
        start = int(torch.randint(length, (1,), generator=generator))
        scores[..., head, start:start + 13] = NEG_INF
    if draw(st.booleans()):  # a fully invalid row
        scores[..., 0, :] = NEG_INF
    return scores


@st.composite
def grouped_scores(draw, max_length: int = 200):
    """(scores [..., H_q, T] in a strided layout, group_size). Groups of 12 exceed the kernel's
    8-head chunk, so the group loop runs twice."""
    h_q, h_kv = draw(pst.gqa_heads(ratios=(1, 2, 3, 4, 12), max_kv_heads=3))
    leading = draw(st.lists(st.integers(1, 2), min_size=0, max_size=2))
    length = draw(pst.lengths(1, max_length))
    group_size = h_q // h_kv
    scores = draw(pst.score_tensors((*leading, h_q, length)))
    scores = _invalidate(draw, scores, group_size)
    return draw(pst.strided_views(scores)), group_size


@st.composite
def score_rows(draw, max_length: int = 200):
    """scores [..., T] in a strided layout, sometimes with a zero row and a fully -inf row."""
    rank = draw(st.integers(1, 4))
    leading = draw(st.lists(st.integers(1, 3), min_size=rank - 1, max_size=rank - 1))
    length = draw(pst.lengths(1, max_length))
    scores = draw(pst.score_tensors((*leading, length))).clone()
    if draw(st.booleans()):  # the usual case: non-negative attention mass
        scores = torch.where(scores == NEG_INF, scores, scores.abs())
    if rank > 1 and draw(st.booleans()):
        scores.view(-1, length)[0] = 0.0
    if rank > 1 and draw(st.booleans()):
        scores.view(-1, length)[-1] = NEG_INF
    return draw(pst.strided_views(scores))


def _pool_kernel_sizes():
    # Up to 19: wider than a small tile, and than many of the rows.
    return st.one_of(st.sampled_from([1, 3, 5, 7]), st.integers(0, 9).map(lambda h: 2 * h + 1))


def _add_pos_inf(draw, scores: torch.Tensor) -> torch.Tensor:
    """A copy of contiguous ``scores`` with ``+inf`` in some rows: one entry, a few, or all."""
    scores = scores.clone()
    rows = scores.view(-1, scores.shape[-1])
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    for row in rows:
        kind = draw(st.sampled_from(["none", "one", "some", "all"]))
        if kind == "one":
            row[int(torch.randint(row.numel(), (1,), generator=generator))] = POS_INF
        elif kind == "some":
            row[torch.rand(row.numel(), generator=generator) < 0.3] = POS_INF
        elif kind == "all":
            row[:] = POS_INF
    return scores


@st.composite
def score_rows_with_pos_inf(draw, max_length: int = 200):
    """Like ``score_rows``, with ``+inf`` entries in some rows (next to ``-inf`` ones, zeros...)."""
    rank = draw(st.integers(1, 3))
    leading = draw(st.lists(st.integers(1, 3), min_size=rank - 1, max_size=rank - 1))
    length = draw(pst.lengths(1, max_length))
    scores = draw(pst.score_tensors((*leading, length)))
    return draw(pst.strided_views(_add_pos_inf(draw, scores)))


@st.composite
def grouped_scores_with_pos_inf(draw, max_length: int = 200):
    """Like ``grouped_scores``, with ``+inf`` entries in some heads' rows."""
    h_q, h_kv = draw(pst.gqa_heads(ratios=(1, 2, 3), max_kv_heads=2))
    leading = draw(st.lists(st.integers(1, 2), min_size=0, max_size=1))
    length = draw(pst.lengths(1, max_length))
    group_size = h_q // h_kv
    scores = _invalidate(draw, draw(pst.score_tensors((*leading, h_q, length))), group_size)
    return draw(pst.strided_views(_add_pos_inf(draw, scores))), group_size


# --- reduce_heads -----------------------------------------------------------------------------

@pytest.mark.parametrize("impl, tile_size", BACKENDS)
@given(data=st.data(), mode=st.sampled_from(["mean", "max"]))
def test_reduce_heads_matches_reference(impl, tile_size, data, mode, device):
    scores, group_size = data.draw(grouped_scores(MAX_LENGTH[tile_size]), label="case")
    expected = reduce_heads_reference(scores, group_size, mode)
    with tiles(tile_size):
        actual = reduce_heads(scores.to(device), group_size, mode=mode, impl=impl)
    assert actual.dtype == torch.float32 and actual.is_contiguous()
    assert_close(actual, expected, name=f"reduce_heads[{mode}, group={group_size}]")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_mean_averages_only_the_heads_that_see_a_position(impl, device):
    # One group of three heads over four positions.
    scores = torch.tensor([[[1.0, NEG_INF, NEG_INF, 2.0],
                            [3.0, 6.0, NEG_INF, 2.0],
                            [5.0, NEG_INF, NEG_INF, 2.0]]], device=device)
    mean = reduce_heads(scores, 3, mode="mean", impl=impl).cpu()
    maximum = reduce_heads(scores, 3, mode="max", impl=impl).cpu()
    assert mean[0, 0].tolist() == [3.0, 6.0, NEG_INF, 2.0]
    assert maximum[0, 0].tolist() == [5.0, 6.0, NEG_INF, 2.0]


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_query_head_h_belongs_to_group_h_over_group_size(impl, device):
    # Head h holds the value h everywhere: group g of size 2 holds heads 2g and 2g + 1.
    scores = torch.arange(6.0, device=device)[None, :, None].expand(2, 6, 5)
    reduced = reduce_heads(scores, 2, mode="max", impl=impl).cpu()
    assert reduced.shape == (2, 3, 5)
    assert torch.equal(reduced[:, :, 0], torch.tensor([[1.0, 3.0, 5.0]] * 2))


# --- normalize_scores -------------------------------------------------------------------------

@pytest.mark.parametrize("impl, tile_size", BACKENDS)
@given(data=st.data(), mode=st.sampled_from(["sum", "max", "none"]))
def test_normalize_scores_matches_reference(impl, tile_size, data, mode, device):
    scores = data.draw(score_rows(MAX_LENGTH[tile_size]), label="scores")
    expected = normalize_scores_reference(scores, mode)
    with tiles(tile_size):
        actual = normalize_scores(scores.to(device), mode=mode, impl=impl)
    assert actual.dtype == torch.float32 and actual.is_contiguous()
    assert_close(actual, expected, name=f"normalize_scores[{mode}]")


@pytest.mark.parametrize("impl, tile_size", BACKENDS)
@given(data=st.data(), mode=st.sampled_from(["sum", "max"]))
def test_normalize_scores_with_pos_inf_matches_reference(impl, tile_size, data, mode, device):
    scores = data.draw(score_rows_with_pos_inf(MAX_LENGTH[tile_size]), label="scores")
    expected = normalize_scores_reference(scores, mode)
    with tiles(tile_size):
        actual = normalize_scores(scores.to(device), mode=mode, impl=impl)
    assert not bool(actual.isnan().any()), "NaN from +inf input"
    assert_close(actual, expected, name=f"normalize_scores[{mode}] with +inf")


@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])
def test_a_row_holding_pos_inf_normalises_to_its_limit(impl, device):
    scores = torch.tensor([[1.0, POS_INF, -2.0, NEG_INF, POS_INF],
                           [NEG_INF, NEG_INF, POS_INF, NEG_INF, NEG_INF],
                           [POS_INF] * 5,
                           [3.0, 1.0, 0.0, NEG_INF, 0.0]], device=device)

    def normalize(mode):
        if impl == "reference":
            return normalize_scores_reference(scores.cpu(), mode)
        return normalize_scores(scores, mode=mode, impl=impl).cpu()

    by_sum, by_max = normalize("sum"), normalize("max")
    assert_close(by_sum, torch.tensor([[0.0, 0.5, 0.0, NEG_INF, 0.5],
                                       [NEG_INF, NEG_INF, 1.0, NEG_INF, NEG_INF],
                                       [0.2] * 5,
                                       [0.75, 0.25, 0.0, NEG_INF, 0.0]]), name="sum")
    assert_close(by_max, torch.tensor([[0.0, 1.0, 0.0, NEG_INF, 1.0],
                                       [NEG_INF, NEG_INF, 1.0, NEG_INF, NEG_INF],
                                       [1.0] * 5,
                                       [1.0, 1.0 / 3.0, 0.0, NEG_INF, 0.0]]), name="max")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_normalized_rows_sum_to_one_or_peak_at_one(impl, device):
    scores = torch.rand(3, 50, device=device) + 0.1
    scores[1, 10:20] = NEG_INF
    by_sum = normalize_scores(scores, mode="sum", impl=impl).cpu()
    by_max = normalize_scores(scores, mode="max", impl=impl).cpu()
    valid = scores.cpu() != NEG_INF
    assert torch.allclose(torch.where(valid, by_sum, 0.0).sum(-1), torch.ones(3))
    assert torch.equal(by_max.amax(-1), torch.ones(3))
    assert torch.isneginf(by_sum[1, 10:20]).all() and torch.isneginf(by_max[1, 10:20]).all()


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["sum", "max"])
def test_zero_and_fully_invalid_rows_come_back_unchanged(impl, mode, device):
    scores = torch.tensor([[0.0, 0.0, NEG_INF, 0.0],
                           [NEG_INF] * 4,
                           [2.0, NEG_INF, 0.0, 2.0]], device=device)
    out = normalize_scores(scores, mode=mode, impl=impl).cpu()
    assert not out.isnan().any()
    assert out[0].tolist() == [0.0, 0.0, NEG_INF, 0.0]
    assert torch.isneginf(out[1]).all()
    assert out[2].tolist() == ([0.5, NEG_INF, 0.0, 0.5] if mode == "sum"
                               else [1.0, NEG_INF, 0.0, 1.0])


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["sum", "max"])
def test_negative_scores_keep_their_order(impl, mode, device):
    scores = torch.tensor([[-4.0, -1.0, -2.0, NEG_INF, -8.0]], device=device)
    out = normalize_scores(scores, mode=mode, impl=impl).cpu()
    divisor = 15.0 if mode == "sum" else 8.0
    assert_close(out, torch.tensor([[-4.0, -1.0, -2.0, NEG_INF, -8.0]]) / divisor)
    assert torch.equal(out.argsort(), scores.cpu().argsort())


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_a_single_position_normalises_to_its_sign(impl, device):
    scores = torch.tensor([[3.0], [-0.5], [0.0], [NEG_INF]], device=device)
    for mode in ("sum", "max"):
        assert normalize_scores(scores, mode=mode, impl=impl).cpu()[:, 0].tolist() == \
            [1.0, -1.0, 0.0, NEG_INF]


# --- aggregate_scores (fused) -----------------------------------------------------------------

@pytest.mark.parametrize("impl, tile_size", BACKENDS)
@given(data=st.data(), group_mode=st.sampled_from(["mean", "max"]),
       pool_kernel_size=_pool_kernel_sizes(), pool_mode=st.sampled_from(["max", "avg"]),
       normalize=st.sampled_from(["sum", "max", "none"]))
def test_fused_aggregation_equals_the_chain_of_ops(impl, tile_size, data, group_mode,
                                                   pool_kernel_size, pool_mode, normalize,
                                                   device):
    scores, group_size = data.draw(grouped_scores(MAX_LENGTH[tile_size]), label="case")
    scores = scores.to(device)
    with tiles(tile_size):
        fused = aggregate_scores(scores, group_size=group_size, group_mode=group_mode,
                                 pool_kernel_size=pool_kernel_size, pool_mode=pool_mode,
                                 normalize=normalize, impl=impl)
        reduced = reduce_heads(scores, group_size, mode=group_mode, impl=impl)
        chained = normalize_scores(pool_scores(reduced, pool_kernel_size, mode=pool_mode,
                                               impl=impl), mode=normalize, impl=impl)
    name = (f"aggregate_scores[group={group_size}/{group_mode}, pool={pool_kernel_size}/"
            f"{pool_mode}, normalize={normalize}]")
    assert fused.shape == chained.shape and fused.is_contiguous()
    assert_close(fused, chained, name=f"{name} vs chain")
    expected = aggregate_scores_reference(scores.cpu(), group_size, group_mode, pool_kernel_size,
                                          pool_mode, normalize)
    assert_close(fused, expected, name=f"{name} vs reference")


@pytest.mark.parametrize("impl, tile_size", BACKENDS)
@given(data=st.data(), group_mode=st.sampled_from(["mean", "max"]),
       pool_kernel_size=_pool_kernel_sizes(), pool_mode=st.sampled_from(["max", "avg"]),
       normalize=st.sampled_from(["sum", "max", "none"]))
def test_fused_aggregation_with_pos_inf_matches_reference(impl, tile_size, data, group_mode,
                                                          pool_kernel_size, pool_mode, normalize,
                                                          device):
    scores, group_size = data.draw(grouped_scores_with_pos_inf(MAX_LENGTH[tile_size]),
                                   label="case")
    expected = aggregate_scores_reference(scores, group_size, group_mode, pool_kernel_size,
                                          pool_mode, normalize)
    with tiles(tile_size):
        actual = aggregate_scores(scores.to(device), group_size=group_size, group_mode=group_mode,
                                  pool_kernel_size=pool_kernel_size, pool_mode=pool_mode,
                                  normalize=normalize, impl=impl)
    assert not bool(actual.isnan().any()), "NaN from +inf input"
    assert_close(actual, expected, name=f"aggregate_scores[group={group_size}/{group_mode}, "
                                        f"pool={pool_kernel_size}/{pool_mode}, "
                                        f"normalize={normalize}] with +inf")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_pos_inf_survives_group_mean_and_pooling(impl, device):
    # One group of two heads; at position 0 one head sees +inf and the other cannot see it.
    scores = torch.tensor([[[POS_INF, 1.0, 2.0, NEG_INF],
                            [NEG_INF, 3.0, NEG_INF, NEG_INF]]], device=device)
    mean = reduce_heads(scores, 2, mode="mean", impl=impl).cpu()
    assert mean[0, 0].tolist() == [POS_INF, 2.0, 2.0, NEG_INF]
    # Pooled (avg, 3): [+inf, +inf, 2, -inf]; normalised by sum: the two +inf share the mass.
    fused = aggregate_scores(scores, group_size=2, pool_kernel_size=3, pool_mode="avg",
                             normalize="sum", impl=impl).cpu()
    assert fused[0, 0].tolist() == [0.5, 0.5, 0.0, NEG_INF]


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_pooling_window_crosses_the_tile_border(impl, device):
    # Tiles of 16 positions: the peak at 15 is the last of tile 0; a window of 5 carries it to
    # 13..17, across into tile 1. Position 18 is invalid for both heads and stays so.
    scores = torch.zeros(1, 2, 40, device=device)
    scores[0, 0, 15] = 8.0
    scores[0, :, 18] = NEG_INF
    with tiles("small"):
        assert aggregate_triton._block_t(40) == 16
        out = aggregate_scores(scores, group_size=2, group_mode="mean", pool_kernel_size=5,
                               pool_mode="max", normalize="max", impl=impl).cpu()
    expected = torch.zeros(40)
    expected[13:18] = 1.0
    expected[18] = NEG_INF
    assert out[0, 0].tolist() == expected.tolist()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_rows_longer_than_one_full_tile(impl, device):
    # The production tile (1024 positions) with a pooled window and a row sum spanning two tiles.
    generator = torch.Generator().manual_seed(1)
    scores = torch.rand(1, 2, 1500, generator=generator)
    scores[0, :, 1020:1030] = NEG_INF
    scores = scores.to(device)
    out = aggregate_scores(scores, group_size=2, pool_kernel_size=7, pool_mode="avg",
                           normalize="sum", impl=impl)
    assert_close(out, aggregate_scores_reference(scores.cpu(), 2, "mean", 7, "avg", "sum"))


# --- combine_layers ---------------------------------------------------------------------------

@st.composite
def layer_mixes(draw):
    batch, layers_in, heads = (draw(st.integers(1, 2)), draw(st.integers(1, 5)),
                               draw(st.integers(1, 3)))
    # More than 64 output layers needs two blocks of output layers in the kernel.
    layers_out = draw(st.one_of(st.integers(1, 6), st.just(70)))
    length = draw(pst.lengths(1, 150))
    scores = draw(pst.score_tensors((batch, layers_in, heads, length)))
    scores = draw(pst.strided_views(scores))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    weights = torch.randn(layers_out, layers_in, generator=generator)
    if draw(st.booleans()):  # sparse mixes: many exact zeros (they must ignore -inf layers)
        weights = weights * (torch.rand(weights.shape, generator=generator) < 0.4)
    if draw(st.booleans()):
        weights = weights.t().contiguous().t()
    return scores, weights


@pytest.mark.parametrize("impl, tile_size", COMBINE_BACKENDS)
@given(case=layer_mixes())
def test_combine_layers_matches_reference(impl, tile_size, case, device):
    scores, weights = case
    expected = combine_layers_reference(scores, weights)
    with tiles(tile_size):
        actual = combine_layers(scores.to(device), weights.to(device), impl=impl)
    assert actual.dtype == torch.float32 and actual.is_contiguous()
    assert_close(actual, expected, name=f"combine_layers[L_out={weights.shape[0]}]")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_invalid_positions_poison_only_outputs_that_use_the_layer(impl, device):
    scores = torch.tensor([[1.0, 2.0, 3.0], [NEG_INF, 10.0, NEG_INF]], device=device)
    scores = scores[None, :, None, :]                       # [B=1, L_in=2, H=1, T=3]
    weights = torch.tensor([[2.0, 0.0],     # ignores layer 1, so its -inf too
                            [1.0, -0.5],    # uses layer 1 with a negative weight: -inf, not +inf
                            [0.0, 0.0]],    # uses nothing: zeros
                           device=device)
    out = combine_layers(scores, weights, impl=impl).cpu()[0, :, 0]
    assert out[0].tolist() == [2.0, 4.0, 6.0]
    assert out[1].tolist() == [NEG_INF, -3.0, NEG_INF]
    assert out[2].tolist() == [0.0, 0.0, 0.0]


# --- backends, inputs, errors -----------------------------------------------------------------

def test_impl_none_runs_the_triton_kernels_under_the_interpreter(monkeypatch, device):
    calls = []
    for name in ("reduce_heads_triton", "normalize_scores_triton", "aggregate_scores_triton",
                 "combine_layers_triton"):
        original = getattr(aggregate_triton, name)
        monkeypatch.setattr(aggregate_triton, name,
                            lambda *args, _name=name, _run=original: calls.append(_name)
                            or _run(*args))
    scores = torch.rand(1, 4, 20, device=device)
    reduce_heads(scores, 2)
    normalize_scores(scores)
    aggregate_scores(scores, group_size=2, pool_kernel_size=3)
    combine_layers(scores[None], torch.ones(2, 1, device=device))
    assert calls == ["reduce_heads_triton", "normalize_scores_triton", "aggregate_scores_triton",
                     "combine_layers_triton"]


def test_inputs_are_not_modified(device):
    scores = torch.randn(2, 4, 30, device=device)
    scores[0, :, 3] = NEG_INF
    weights = torch.randn(3, 2, device=device)
    before, weights_before = scores.clone(), weights.clone()
    for impl in ("torch", "triton"):
        reduce_heads(scores, 2, impl=impl)
        normalize_scores(scores, mode="sum", impl=impl)
        normalize_scores(scores, mode="none", impl=impl)
        aggregate_scores(scores, group_size=4, pool_kernel_size=5, normalize="max", impl=impl)
        combine_layers(scores[None, :2], weights, impl=impl)
    assert torch.equal(scores, before) and torch.equal(weights, weights_before)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_an_empty_leading_dimension_is_refused(impl, device):
    scores = torch.zeros(0, 4, 9, device=device)
    empty = r"scores must have every dimension >= 1 \[\.\.\., H_q, T\], got shape \(0, 4, 9\)"
    with pytest.raises(ValueError, match=empty):
        reduce_heads(scores, 2, impl=impl)
    with pytest.raises(ValueError, match=empty):
        aggregate_scores(scores, group_size=4, pool_kernel_size=3, normalize="sum", impl=impl)
    with pytest.raises(ValueError, match=r"scores must have every dimension >= 1 \[\.\.\., T\]"):
        normalize_scores(scores, impl=impl)
    with pytest.raises(ValueError, match=r"scores must have H >= 1, got shape \(1, 2, 0, 9\)"):
        combine_layers(torch.zeros(1, 2, 0, 9, device=device), torch.ones(3, 2, device=device),
                       impl=impl)


def test_more_than_three_unmergeable_leading_dims_raise_on_triton(device):
    # Leading dims B, L, X, H_kv all step over gaps: four strided dims for the kernel's three.
    scores = torch.randn(4, 4, 4, 8, 5, device=device)[::2, ::2, ::2, :, :3]
    with pytest.raises(ValueError, match="cannot be walked as 3 strided dimensions"):
        reduce_heads(scores, 2, impl="triton")
    assert_close(reduce_heads(scores, 2, impl="torch"),
                 reduce_heads_reference(scores.cpu(), 2, "mean"))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: reduce_heads(torch.zeros(8), 1), ValueError,
         r"scores must have at least 2 dimension\(s\) \[\.\.\., H_q, T\], got shape \(8,\)"),
        (lambda: reduce_heads(torch.zeros(2, 4, 8, dtype=torch.float16), 2), TypeError,
         "scores must be float32 or float64, got torch.float16"),
        (lambda: reduce_heads(torch.zeros(2, 6, 8), 4), ValueError,
         r"group_size=4 must divide the number of query heads H_q=6 \(scores.shape\[-2\]"),
        (lambda: reduce_heads(torch.zeros(2, 4, 8), 0), ValueError,
         "group_size must be >= 1, got 0"),
        (lambda: reduce_heads(torch.zeros(2, 4, 8), 2.0), TypeError,
         "group_size must be an int, got float"),
        (lambda: reduce_heads(torch.zeros(2, 4, 0), 2), ValueError,
         r"scores must have at least one position \(T >= 1\), got shape \(2, 4, 0\)"),
        (lambda: reduce_heads(torch.zeros(2, 4, 8), 2, mode="sum"), ValueError,
         "mode must be one of 'mean' or 'max', got 'sum'"),
        (lambda: reduce_heads(torch.zeros(2, 4, 8), 2, impl="cuda"), ValueError,
         "impl must be one of 'triton', 'torch' or None, got 'cuda'"),
        (lambda: normalize_scores([1.0, 2.0]), TypeError,
         "scores must be a torch.Tensor, got list"),
        (lambda: normalize_scores(torch.tensor(1.0)), ValueError,
         r"scores must have at least 1 dimension\(s\) \[\.\.\., T\], got shape \(\)"),
        (lambda: normalize_scores(torch.zeros(3, 5), mode="l2"), ValueError,
         "mode must be one of 'sum', 'max' or 'none', got 'l2'"),
        (lambda: normalize_scores(torch.zeros(3, 5, dtype=torch.bfloat16)), TypeError,
         "scores must be float32 or float64, got torch.bfloat16"),
        (lambda: normalize_scores(torch.zeros(3, 0)), ValueError, r"at least one position"),
        (lambda: aggregate_scores(torch.zeros(2, 4, 8), group_size=3), ValueError,
         "group_size=3 must divide the number of query heads H_q=4"),
        (lambda: aggregate_scores(torch.zeros(2, 4, 8), group_size=2, group_mode="min"),
         ValueError, "group_mode must be one of 'mean' or 'max', got 'min'"),
        (lambda: aggregate_scores(torch.zeros(2, 4, 8), group_size=2, pool_kernel_size=4),
         ValueError, r"pool_kernel_size must be odd \(the window is centred\), got 4"),
        (lambda: aggregate_scores(torch.zeros(2, 4, 8), group_size=2, pool_kernel_size=0),
         ValueError, "pool_kernel_size must be >= 1, got 0"),
        (lambda: aggregate_scores(torch.zeros(2, 4, 8), group_size=2, pool_mode="mean"),
         ValueError, "pool_mode must be one of 'max' or 'avg', got 'mean'"),
        (lambda: aggregate_scores(torch.zeros(2, 4, 8), group_size=2, normalize=True),
         ValueError, "normalize must be one of 'sum', 'max' or 'none', got True"),
        (lambda: combine_layers(torch.zeros(3, 4, 5), torch.ones(2, 3)), ValueError,
         r"scores must be a 4-D tensor \[B, L_in, H, T\], got shape \(3, 4, 5\)"),
        (lambda: combine_layers(torch.zeros(1, 3, 2, 5), torch.ones(3)), ValueError,
         r"weights must be a 2-D tensor \[L_out, L_in\], got shape \(3,\)"),
        (lambda: combine_layers(torch.zeros(1, 3, 2, 5), torch.ones(2, 4)), ValueError,
         r"weights has the number of input layers L_in 4 in dimension 1, expected 3"),
        (lambda: combine_layers(torch.zeros(1, 3, 2, 5), torch.ones(0, 3)), ValueError,
         r"weights must have at least one output layer \(L_out >= 1\), got shape \(0, 3\)"),
        (lambda: combine_layers(torch.zeros(1, 3, 2, 5), torch.ones(2, 3, dtype=torch.float64)),
         TypeError, "weights must be float32, got torch.float64"),
        (lambda: combine_layers(torch.zeros(1, 3, 2, 5, dtype=torch.bfloat16), torch.ones(2, 3)),
         TypeError, "scores must be float32 or float64, got torch.bfloat16"),
        (lambda: combine_layers(torch.zeros(1, 3, 2, 0), torch.ones(2, 3)), ValueError,
         r"scores must have at least one position \(T >= 1\)"),
        (lambda: combine_layers(torch.zeros(1, 3, 2, 5), torch.ones(2, 3, device="meta")),
         ValueError, "scores and weights must be on the same device, got cpu and meta"),
    ],
    ids=["reduce-rank1", "reduce-fp16", "reduce-indivisible", "reduce-group0",
         "reduce-group-float", "reduce-empty-T", "reduce-mode", "reduce-impl", "norm-list",
         "norm-rank0", "norm-mode", "norm-bf16", "norm-empty-T", "agg-indivisible",
         "agg-group-mode", "agg-even-window", "agg-window0", "agg-pool-mode", "agg-normalize",
         "comb-rank3", "comb-weights-rank1", "comb-L_in", "comb-L_out0", "comb-weights-fp64",
         "comb-bf16", "comb-empty-T", "comb-device"],
)
def test_bad_input_raises_before_running(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='triton' cannot run: tensors are on the CPU"):
        aggregate_scores(torch.zeros(1, 2, 8), group_size=2, impl="triton")
