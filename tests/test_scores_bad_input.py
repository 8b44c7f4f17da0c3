"""The score-tensor rules of docs/bad-input.md at every entry point that takes scores: the policies
(``select`` and ``keep_mask``), the aggregation ops and ``pool_scores``.

float32, or float64 read as float32; half precision refused; ``meta`` tensors and empty dimensions
refused (naming ``scores``) before any work; NaN in policy scores refused at its first position;
``+inf`` is a valid policy score that ranks first and never turns into NaN.
"""

import pytest
import torch

from proxykv.kernels import (
    aggregate_scores,
    combine_layers,
    normalize_scores,
    pool_scores,
    reduce_heads,
)
from proxykv.policies import get_policy
from proxykv.policies import reference as ref
from proxykv.selection import Selection

NEG_INF = float("-inf")
POS_INF = float("inf")
SHAPE = (1, 2, 2, 8)


def _row_budget(scores: torch.Tensor, budget: int) -> torch.Tensor:
    return torch.full(scores.shape[:3], budget, dtype=torch.int64, device=scores.device)


# Every public entry point that takes a score tensor, called on 4-D scores.
SCORE_ENTRY_POINTS = [
    pytest.param(lambda s: get_policy("topk").select(s, budget=2), id="select"),
    pytest.param(lambda s: get_policy("topk").keep_mask(s, _row_budget(s, 2)), id="keep_mask"),
    pytest.param(lambda s: normalize_scores(s, mode="sum"), id="normalize_scores"),
    pytest.param(lambda s: reduce_heads(s, 2), id="reduce_heads"),
    pytest.param(lambda s: aggregate_scores(s, group_size=2, pool_kernel_size=3,
                                            normalize="sum"), id="aggregate_scores"),
    pytest.param(lambda s: combine_layers(s, torch.ones(3, s.shape[1], device=s.device)),
                 id="combine_layers"),
    pytest.param(lambda s: pool_scores(s, 3, mode="avg"), id="pool_scores"),
]


def _as_comparable(result):
    return result.to_mask() if isinstance(result, Selection) else result


@pytest.mark.parametrize("call", SCORE_ENTRY_POINTS)
def test_float64_scores_are_read_as_float32(call, device):
    scores = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    scores[0, 1, 0, 2:5] = NEG_INF
    from_double = _as_comparable(call(scores.to(device)))
    from_single = _as_comparable(call(scores.float().to(device)))
    if from_double.is_floating_point():
        assert from_double.dtype == torch.float32
    assert torch.equal(from_double, from_single)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("call", SCORE_ENTRY_POINTS)
def test_other_score_dtypes_are_refused(call, dtype):
    with pytest.raises(TypeError, match=f"scores must be float32 or float64, got {dtype}"):
        call(torch.zeros(SHAPE, dtype=dtype))


@pytest.mark.parametrize("call", SCORE_ENTRY_POINTS)
def test_meta_scores_are_refused_before_any_work(call):
    with pytest.raises(ValueError, match="scores must be on a CPU or CUDA device, got meta"):
        call(torch.zeros(SHAPE, device="meta"))


@pytest.mark.parametrize("dim", [0, 1, 2, 3], ids=["B", "L", "H", "T"])
@pytest.mark.parametrize("call", SCORE_ENTRY_POINTS)
def test_an_empty_dimension_is_refused(call, dim):
    shape = list(SHAPE)
    shape[dim] = 0
    with pytest.raises(ValueError, match=r"scores must have .*>= 1.*got shape "
                                         + repr(tuple(shape)).replace("(", r"\(")
                                         .replace(")", r"\)")):
        call(torch.zeros(shape))


# ----------------------------------------------------------------------------- policy scores
NAN_SCORES = torch.zeros(SHAPE)
NAN_SCORES[0, 1, 0, 3] = float("nan")
NAN_SCORES[0, 1, 1, 0] = float("nan")


@pytest.mark.parametrize("call", [
    pytest.param(lambda s: get_policy("topk").select(s, budget=2), id="select"),
    pytest.param(lambda s: get_policy("head_budget").keep_mask(s, _row_budget(s, 2)),
                 id="keep_mask"),
    pytest.param(lambda s: get_policy("threshold", tau=0.0).keep_mask(s, None),
                 id="keep_mask-adaptive"),
])
def test_nan_policy_scores_are_refused_at_the_first_bad_position(call):
    with pytest.raises(ValueError, match=r"scores must hold no NaN \(use -inf for invalid "
                                         r"positions\); found nan at position \[0, 1, 0, 3\] of "
                                         r"shape \(1, 2, 2, 8\)"):
        call(NAN_SCORES)


@pytest.mark.parametrize("row_budget, error, message", [
    pytest.param(None, TypeError, "row_budget must be a torch.Tensor, got NoneType", id="none"),
    pytest.param([2, 2], TypeError, "row_budget must be a torch.Tensor, got list", id="list"),
    pytest.param(torch.full((1, 2, 2), 2.0), TypeError,
                 "row_budget must be int32 or int64, got torch.float32", id="float"),
    pytest.param(torch.full((1, 2), 2), ValueError,
                 r"row_budget must have shape \[B, L, H_kv\] = \(1, 2, 2\), got \(1, 2\)",
                 id="shape"),
    pytest.param(torch.tensor([[[2, -1], [2, 2]]]), ValueError,
                 r"row_budget must lie in \[0, 8\] \(positions kept per head\), got values in "
                 r"\[-1, 2\]", id="negative"),
    pytest.param(torch.tensor([[[2, 9], [2, 2]]]), ValueError,
                 r"row_budget must lie in \[0, 8\]", id="past-T"),
    pytest.param(torch.full((1, 2, 2), 2, device="meta"), ValueError,
                 "scores and row_budget must be on the same device, got cpu and meta",
                 id="device"),
])
def test_keep_mask_checks_row_budget(row_budget, error, message):
    with pytest.raises(error, match=message):
        get_policy("topk").keep_mask(torch.zeros(SHAPE), row_budget)


def test_an_adaptive_policy_refuses_a_row_budget():
    with pytest.raises(ValueError, match=r"row_budget must be None for Threshold\(tau=0.0, "
                                         r"min_per_head=0\), which chooses its own budget"):
        get_policy("threshold", tau=0.0).keep_mask(torch.zeros(SHAPE), _row_budget(
            torch.zeros(SHAPE), 2))


def test_keep_mask_called_directly_matches_select(device):
    scores = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(device)
    policy = get_policy("pooled_window", window=2, inner=get_policy("head_budget"))
    direct = policy.keep_mask(scores.double(), _row_budget(scores, 4).int())
    assert torch.equal(direct, policy.select(scores, budget=4).to_mask())


def _with_pos_inf(seed: int = 0) -> torch.Tensor:
    """Random scores with +inf at a few positions of some heads (two +inf in one head, to see the
    tie go to the lower position) and some -inf."""
    scores = torch.randn(2, 2, 2, 12, generator=torch.Generator().manual_seed(seed))
    scores[0, 0, 0, [3, 7]] = POS_INF
    scores[0, 1, 1, 10] = POS_INF
    scores[1, 0, 1, [0, 5, 6]] = POS_INF
    scores[1, 1, 0, 4:6] = NEG_INF
    return scores


def _keeps_pos_inf_first(mask: torch.Tensor, scores: torch.Tensor) -> None:
    """Every head keeps its +inf positions before any finite one (lower position first among
    them), and never a -inf one."""
    kept = mask.sum(-1)
    infinite = torch.isposinf(scores)
    n_inf = infinite.sum(-1)
    expected_inf = torch.minimum(kept, n_inf)
    assert torch.equal((mask & infinite).sum(-1), expected_inf)
    order = ref.topk_reference(torch.where(infinite, 1.0, 0.0).masked_fill(scores == NEG_INF,
                                                                           NEG_INF),
                               expected_inf.tolist())
    assert torch.equal(mask & infinite, order & infinite)
    assert not bool((mask & (scores == NEG_INF)).any())


@pytest.mark.parametrize("budget", [1, 2, 5])
def test_topk_keeps_pos_inf_first_with_ties_to_the_lower_position(budget, device):
    scores = _with_pos_inf()
    selection = get_policy("topk").select(scores.to(device), budget=budget)
    selection.validate()
    mask = selection.to_mask().cpu()
    assert torch.equal(mask, ref.topk_reference(scores, budget))
    _keeps_pos_inf_first(mask, scores)
    if budget == 1:
        assert mask[0, 0, 0].nonzero().flatten().tolist() == [3]


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("budget", [1, 3])
def test_head_budget_keeps_pos_inf_first(scope, budget, device):
    scores = _with_pos_inf(1)
    selection = get_policy("head_budget", scope=scope, alpha=0.0).select(scores.to(device),
                                                                         budget=budget)
    selection.validate()
    mask = selection.to_mask().cpu()
    assert torch.equal(mask, ref.head_budget_reference(scores, budget, scope, 0.0))
    # Across the heads of a scope, every +inf position comes before any finite one.
    dims = (2, 3) if scope == "layer" else (1, 2, 3)
    infinite = torch.isposinf(scores)
    kept_inf = (mask & infinite).sum(dims)
    assert torch.equal(kept_inf, torch.minimum(mask.sum(dims), infinite.sum(dims)))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_pooled_window_keeps_pos_inf_and_its_neighbours_first(impl, mode, device):
    scores = torch.randn(1, 1, 2, 20, generator=torch.Generator().manual_seed(2))
    scores[0, 0, 0, 8] = POS_INF
    scores[0, 0, 1, [3, 12]] = POS_INF
    scores[0, 0, 1, 13] = NEG_INF
    policy = get_policy("pooled_window", window=2, kernel_size=3, mode=mode, impl=impl)
    selection = policy.select(scores.to(device), budget=5)
    selection.validate()
    mask = selection.to_mask().cpu()
    # The window (18, 19), then pooled +inf at each +inf position and its valid neighbours.
    assert mask[0, 0, 0].nonzero().flatten().tolist() == [7, 8, 9, 18, 19]
    assert mask[0, 0, 1].nonzero().flatten().tolist() == [2, 3, 4, 18, 19]


@pytest.mark.parametrize("name, params", [
    pytest.param("sink_recent", {"n_sink": 1, "inner": get_policy("topk")}, id="sink_recent"),
    pytest.param("pyramid", {"beta": 2.0}, id="pyramid"),
    pytest.param("threshold", {"tau": 0.5, "min_per_head": 2}, id="threshold"),
])
def test_other_policies_accept_pos_inf(name, params, device):
    scores = _with_pos_inf(3)
    budget = {} if name == "threshold" else {"budget": 4}
    selection = get_policy(name, **params).select(scores.to(device), **budget)
    selection.validate()
    mask = selection.to_mask().cpu()
    assert bool((mask | ~torch.isposinf(scores)).all()), "a +inf position was dropped"
