"""head_budget compares scores across heads, so it normalises each head first (``normalize``).

The failure this guards against: an aligner is trained with ranking losses that fix each head's
order but leave its offset free, so its heads sit at unrelated levels (the zoo's axial aligner puts
one head of a layer hundreds of units above the other). Compared raw, the higher head takes the
whole pooled budget and the other one is cut to its floor, whatever its scores say."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from proxykv.policies import (
    HEAD_BUDGET_NORMALIZATIONS,
    HeadBudget,
    get_policy,
    normalize_head_scores,
)
from proxykv.policies import reference as ref
from proxykv.testing import assert_close
from proxykv.testing.strategies import score_tensors

NEG_INF = float("-inf")
POS_INF = float("inf")


def two_heads_at_different_levels(offset: float = 100.0, seq_len: int = 20) -> torch.Tensor:
    """``[1, 1, 2, T]`` log-scores: head 1 is head 0 (distinct values) moved up by ``offset``."""
    generator = torch.Generator().manual_seed(0)
    head = torch.randn(seq_len, generator=generator)
    return torch.stack([head, head + offset]).view(1, 1, 2, seq_len)


# ----------------------------------------------------------------------------------- the failure
def test_the_default_does_not_starve_a_head_whose_scores_sit_lower(device):
    scores = two_heads_at_different_levels()
    selection = get_policy("head_budget", alpha=0.2).select(scores.to(device), budget=5)
    # Same shape of scores in both heads, so the same share of the pooled budget (10).
    assert selection.counts().tolist() == [[[5, 5]]]
    mask = selection.to_mask().cpu()
    assert torch.equal(mask[0, 0, 0], mask[0, 0, 1])  # and the same positions


def test_normalize_none_keeps_the_raw_comparison_that_starves_the_lower_head(device):
    scores = two_heads_at_different_levels()
    selection = get_policy("head_budget", alpha=0.2, normalize="none").select(
        scores.to(device), budget=5)
    assert selection.counts().tolist() == [[[1, 9]]]  # head 0: its floor only


def test_the_global_scope_does_not_starve_a_lower_layer_either(device):
    generator = torch.Generator().manual_seed(1)
    layer = torch.randn(2, 30, generator=generator)
    scores = torch.stack([layer - 500.0, layer + 300.0]).view(1, 2, 2, 30)
    policy = get_policy("head_budget", scope="global", alpha=0.2)
    counts = policy.select(scores.to(device), budget=6).counts()[0].tolist()
    assert counts[0] == counts[1] and sum(counts[0]) == 12  # the two layers alike
    raw = get_policy("head_budget", scope="global", alpha=0.2, normalize="none")
    counts = raw.select(scores.to(device), budget=6).counts()[0].tolist()
    assert counts[0] == [1, 1] and sum(counts[1]) == 22  # layer 0 cut to its floors


# ----------------------------------------------------------------------------------- invariances
@pytest.mark.parametrize("scope", ["layer", "global"])
@given(scores=score_tensors((2, 3, 3, 17), ties=False), data=st.data())
def test_softmax_selection_ignores_a_constant_added_to_a_head(scope, scores, data, device):
    budget = data.draw(st.integers(1, 17))
    shifts = torch.tensor(data.draw(st.lists(st.integers(-300, 300), min_size=18, max_size=18)),
                          dtype=torch.float32).view(2, 3, 3, 1)
    policy = get_policy("head_budget", scope=scope, alpha=0.2)
    plain = policy.select(scores.to(device), budget=budget).to_mask()
    shifted = policy.select((scores + shifts).to(device), budget=budget).to_mask()
    assert torch.equal(plain, shifted)


@pytest.mark.parametrize("scope", ["layer", "global"])
@given(scores=score_tensors((2, 3, 3, 17)), data=st.data())
def test_sum_selection_ignores_a_head_scaled_by_a_positive_constant(scope, scores, data, device):
    mass = torch.where(scores > NEG_INF, scores.abs(), scores)
    budget = data.draw(st.integers(1, 17))
    powers = data.draw(st.lists(st.integers(-20, 20), min_size=18, max_size=18))
    scales = torch.tensor([2.0 ** p for p in powers]).view(2, 3, 3, 1)  # exact in float32
    policy = get_policy("head_budget", scope=scope, alpha=0.2, normalize="sum")
    plain = policy.select(mass.to(device), budget=budget).to_mask()
    scaled = policy.select((mass * scales).to(device), budget=budget).to_mask()
    assert torch.equal(plain, scaled)


# ----------------------------------------------------------------------------------- the scores
@given(scores=score_tensors((2, 2, 3, 11)))
def test_softmax_scores_are_log_shares_of_each_head(scores, device):
    normalised = normalize_head_scores(scores.to(device), "softmax").cpu()
    assert normalised.dtype == torch.float32
    assert torch.equal(normalised == NEG_INF, scores == NEG_INF)
    shares = normalised.double().exp().sum(-1)
    has_valid = (scores > NEG_INF).any(-1)
    assert_close(shares[has_valid], torch.ones_like(shares[has_valid]), dtype=torch.float32)
    assert torch.equal(normalised, ref.normalized_rows_reference(scores, "softmax"))


@given(scores=score_tensors((2, 2, 3, 11)))
def test_sum_scores_are_shares_of_each_head(scores, device):
    mass = torch.where(scores > NEG_INF, scores.abs(), scores)
    normalised = normalize_head_scores(mass.to(device), "sum").cpu()
    assert torch.equal(normalised == NEG_INF, mass == NEG_INF)
    totals = torch.where(normalised > NEG_INF, normalised, 0.0).double().sum(-1)
    positive = torch.where(mass > NEG_INF, mass, 0.0).sum(-1) > 0
    assert_close(totals[positive], torch.ones_like(totals[positive]), dtype=torch.float32)
    assert torch.equal(normalised, ref.normalized_rows_reference(mass, "sum"))


def test_normalize_keeps_infinities_and_empty_heads(device):
    scores = torch.tensor([[[[3.0, POS_INF, NEG_INF, 1.0],
                             [NEG_INF, NEG_INF, NEG_INF, NEG_INF],
                             [0.0, 0.0, NEG_INF, 0.0]]]])
    softmax = normalize_head_scores(scores.to(device), "softmax").cpu()
    assert softmax[0, 0, 0, 1] == POS_INF and softmax[0, 0, 0, 2] == NEG_INF
    assert bool(torch.isfinite(softmax[0, 0, 0, [0, 3]]).all())  # finite among themselves
    assert bool((softmax[0, 0, 1] == NEG_INF).all())
    mass = normalize_head_scores(scores.to(device), "sum").cpu()
    assert mass[0, 0, 0].tolist() == [0.75, POS_INF, NEG_INF, 0.25]
    assert mass[0, 0, 2].tolist() == [0.0, 0.0, NEG_INF, 0.0]  # a head of zero mass stays 0
    assert torch.equal(normalize_head_scores(scores.to(device), "none").cpu(), scores)
    # +inf still ranks first, and no invalid position is kept
    selection = get_policy("head_budget", alpha=0.0).select(scores.to(device), budget=2)
    mask = selection.to_mask().cpu()
    assert bool(mask[0, 0, 0, 1]) and not bool((mask & (scores == NEG_INF)).any())


def test_normalize_does_not_modify_the_scores(device):
    scores = two_heads_at_different_levels().abs().to(device)  # >= 0, for "sum" too
    before = scores.clone()
    for normalize in HEAD_BUDGET_NORMALIZATIONS:
        normalize_head_scores(scores, normalize)
        get_policy("head_budget", normalize=normalize).select(scores, budget=3)
    assert torch.equal(scores, before)


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("value", "error", "match"), [
    pytest.param("rank", ValueError, r"normalize must be one of .*softmax.*got 'rank'", id="name"),
    pytest.param(None, TypeError, r"normalize must be a str.*got NoneType None", id="none"),
    pytest.param(1, TypeError, r"normalize must be a str.*got int 1", id="int"),
])
def test_a_bad_normalize_is_refused_naming_it(value, error, match):
    with pytest.raises(error, match=match):
        get_policy("head_budget", normalize=value)
    with pytest.raises(error, match=match):
        HeadBudget(normalize=value)
    with pytest.raises(error, match=match):
        normalize_head_scores(torch.zeros(1, 1, 1, 2), value)


@pytest.mark.parametrize(("scores", "error", "match"), [
    pytest.param(torch.zeros(2, 3), ValueError, r"scores must be a 4-D tensor", id="shape"),
    pytest.param(torch.zeros(1, 1, 1, 2, dtype=torch.int64), TypeError,
                 r"scores must be float32 or float64, got torch.int64", id="dtype"),
    pytest.param(torch.tensor([[[[NEG_INF, float("nan")]]]]), ValueError,
                 r"scores must hold no NaN.*\[0, 0, 0, 1\]", id="nan"),
    pytest.param([[[[1.0]]]], TypeError, r"scores must be a torch.Tensor, got list", id="list"),
])
def test_bad_scores_are_refused_naming_them(scores, error, match):
    with pytest.raises(error, match=match):
        normalize_head_scores(scores, "softmax")


def test_sum_refuses_negative_scores_naming_them(device):
    scores = torch.tensor([[[[0.5, 0.2], [0.1, -0.3]]]], device=device)
    with pytest.raises(ValueError, match=r"scores must be >= 0 .*normalize='sum', got -0.3.* "
                                         r"at \[0, 0, 1, 1\]"):
        get_policy("head_budget", normalize="sum").select(scores, budget=1)


def test_the_default_is_softmax_and_shows_in_the_repr():
    policy = get_policy("head_budget")
    assert policy.normalize == "softmax"
    assert repr(policy) == "HeadBudget(scope='layer', alpha=0.2, normalize='softmax')"
