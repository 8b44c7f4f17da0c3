"""Selection policies: each one against its naive oracle (proxykv.policies.reference), plus the
invariants every policy must keep (layout, no invalid position, protection, budgets, monotonicity,
batch independence)."""

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from proxykv.kernels import pool_scores
from proxykv.policies import get_policy, protect
from proxykv.policies import reference as ref
from proxykv.testing import assert_close
from proxykv.testing.strategies import lengths, score_tensors, strided_views

NEG_INF = float("-inf")


@st.composite
def score_cases(draw, max_len: int = 80, max_layers: int = 4):
    """float32 ``[B, L, H, T]`` with ties, scattered ``-inf`` and sometimes a fully invalid head."""
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, max_layers)), draw(st.integers(1, 3)),
             draw(lengths(1, max_len)))
    scores = draw(score_tensors(shape))
    if draw(st.integers(0, 4)) == 0:
        b, layer, h = (draw(st.integers(0, n - 1)) for n in shape[:3])
        scores[b, layer, h] = NEG_INF
    return scores


def keep_mask(policy, scores, device, **budget):
    selection = policy.select(scores.to(device), **budget)
    selection.validate()
    mask = selection.to_mask().cpu()
    assert not bool((mask & (scores == NEG_INF)).any()), "an invalid (-inf) position was kept"
    return selection, mask


def valid_counts(scores):
    return (scores > NEG_INF).sum(-1)


def assert_dominance(scores, mask):
    """Within each head every kept score >= every dropped valid score."""
    kept_min = torch.where(mask, scores, torch.full_like(scores, math.inf)).amin(-1)
    dropped = ~mask & (scores > NEG_INF)
    dropped_max = torch.where(dropped, scores, torch.full_like(scores, NEG_INF)).amax(-1)
    assert bool((kept_min >= dropped_max).all()), "a dropped score beats a kept one"


# ----------------------------------------------------------------------------------- topk
@given(scores=score_cases(), data=st.data())
def test_topk_keeps_the_best_positions_with_ties_to_the_lower_one(scores, data, device):
    budget = data.draw(st.integers(1, scores.shape[-1]))
    selection, mask = keep_mask(get_policy("topk"), scores, device, budget=budget)
    assert torch.equal(mask, ref.topk_reference(scores, budget))
    assert torch.equal(mask.sum(-1), valid_counts(scores).clamp(max=budget))
    assert_dominance(scores, mask)
    counts = mask.sum(-1)
    assert selection.is_ragged == bool((counts != counts.flatten()[0]).any())
    assert selection.budget == budget


@given(scores=score_cases(), ratio=st.floats(0.001, 1.0))
def test_keep_ratio_maps_to_a_count_within_one_of_ratio_times_t(scores, ratio, device):
    scores = scores.masked_fill(scores == NEG_INF, 0.0)
    seq_len = scores.shape[-1]
    selection, _ = keep_mask(get_policy("topk"), scores, device, keep_ratio=ratio)
    kept_per_head = selection.indices.shape[-1]
    assert not selection.is_ragged and kept_per_head == max(1, math.floor(ratio * seq_len + 0.5))
    assert abs(kept_per_head - ratio * seq_len) < 1


def test_topk_breaks_ties_towards_the_lower_position(device):
    scores = torch.tensor([[[[1.0, 3.0, 2.0, 3.0, 3.0, NEG_INF]]]])
    selection = get_policy("topk").select(scores.to(device), budget=2)
    assert selection.indices.tolist() == [[[[1, 3]]]]
    selection = get_policy("topk").select(scores.to(device), budget=5)
    assert selection.indices.tolist() == [[[[0, 1, 2, 3, 4]]]]


def test_a_head_with_fewer_valid_positions_than_the_budget_keeps_them_all(device):
    scores = torch.zeros(1, 1, 2, 6)
    scores[0, 0, 1, 2:] = NEG_INF
    selection = get_policy("topk").select(scores.to(device), budget=4)
    assert selection.is_ragged and selection.counts().tolist() == [[[4, 2]]]
    assert selection.to_mask()[0, 0, 1].nonzero().flatten().tolist() == [0, 1]
    assert selection.budget == 4


def test_fully_invalid_scores_keep_nothing(device):
    scores = torch.full((2, 1, 1, 5), NEG_INF)
    for name, params in (("topk", {}), ("head_budget", {"scope": "global"}), ("pyramid", {})):
        selection = get_policy(name, **params).select(scores.to(device), budget=3)
        selection.validate()
        assert selection.total_kept == 0


# ----------------------------------------------------------------------------------- head_budget
@pytest.mark.parametrize("normalize", ["softmax", "sum", "none"])
@pytest.mark.parametrize("scope", ["layer", "global"])
@given(scores=score_cases(), alpha=st.sampled_from([0.0, 0.2, 0.5, 1.0]), data=st.data())
def test_head_budget_matches_the_adakv_oracle(scope, normalize, scores, alpha, data, device):
    if normalize == "sum":  # attention mass: >= 0
        scores = torch.where(scores > NEG_INF, scores.abs(), scores)
    budget = data.draw(st.integers(1, scores.shape[-1]))
    policy = get_policy("head_budget", scope=scope, alpha=alpha, normalize=normalize)
    selection, mask = keep_mask(policy, scores, device, budget=budget)
    assert torch.equal(mask, ref.head_budget_reference(scores, budget, scope, alpha, normalize))
    assert selection.is_ragged and selection.budget == budget
    valid = valid_counts(scores)
    pooled_dims = (2,) if scope == "layer" else (1, 2)
    heads_pooled = scores.shape[2] * (1 if scope == "layer" else scores.shape[1])
    # Total per scope: exactly the pooled budget, or every valid position if there are fewer.
    assert torch.equal(mask.sum(-1).sum(pooled_dims),
                       valid.sum(pooled_dims).clamp(max=budget * heads_pooled))
    # The floor: every head keeps at least round_half_up(alpha * budget) (or all its valid ones).
    floor = math.floor(alpha * budget + 0.5)
    assert bool((mask.sum(-1) >= valid.clamp(max=floor)).all())


@pytest.mark.parametrize("normalize", ["softmax", "sum", "none"])
def test_head_budget_moves_budget_to_the_head_with_spread_scores(normalize, device):
    peaked = torch.tensor([9.0, 8.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    spread = torch.tensor([5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 1.0, 1.0])
    scores = torch.stack([peaked, spread]).view(1, 1, 2, 8)
    policy = get_policy("head_budget", alpha=0.25, normalize=normalize)
    selection = policy.select(scores.to(device), budget=4)
    # floor 1 each (9; the first 5); the other 6 go to 8 (head 0) and the five 5s left in head 1,
    # raw or normalised (softmax: 8 -> -1.31, 5 -> -1.79, 0 -> -9.3; sum: 8/17, 5/32, 0).
    assert selection.counts().tolist() == [[[2, 6]]]


# ----------------------------------------------------------------------------------- monotonicity
MONOTONE_POLICIES = [
    pytest.param(lambda: get_policy("topk"), id="topk"),
    pytest.param(lambda: get_policy("head_budget", scope="layer", alpha=0.2),
                 id="head_budget-layer"),
    pytest.param(lambda: get_policy("head_budget", scope="global", alpha=0.5),
                 id="head_budget-global"),
    pytest.param(lambda: get_policy("head_budget", scope="global", alpha=0.0),
                 id="head_budget-global-nofloor"),
    pytest.param(lambda: protect(get_policy("head_budget", alpha=0.2), n_sink=1, n_recent=2),
                 id="protected-head_budget"),
]


@pytest.mark.parametrize("make_policy", MONOTONE_POLICIES)
@given(scores=score_cases(), data=st.data())
def test_raising_the_budget_never_drops_a_kept_position(make_policy, scores, data, device):
    seq_len = scores.shape[-1]
    assume(seq_len >= 4)
    policy = make_policy()
    low = data.draw(st.integers(3, seq_len))
    high = data.draw(st.integers(low, seq_len))
    _, low_mask = keep_mask(policy, scores, device, budget=low)
    _, high_mask = keep_mask(policy, scores, device, budget=high)
    assert not bool((low_mask & ~high_mask).any())


# ----------------------------------------------------------------------------------- protection
@given(scores=score_cases(), n_sink=st.integers(0, 5), data=st.data())
def test_sink_recent_alone_keeps_sinks_then_the_most_recent_positions(scores, n_sink, data,
                                                                      device):
    seq_len = scores.shape[-1]
    assume(n_sink <= seq_len)
    budget = data.draw(st.integers(max(1, n_sink), seq_len))
    n_recent = data.draw(st.integers(0, budget - n_sink))  # alone, it changes nothing
    policy = get_policy("sink_recent", n_sink=n_sink, n_recent=n_recent)
    selection, mask = keep_mask(policy, scores, device, budget=budget)
    assert torch.equal(mask, ref.sink_recent_reference(scores, budget, n_sink))
    if not bool((scores == NEG_INF).any()):
        expected = sorted(set(range(n_sink)) | set(range(seq_len - (budget - n_sink), seq_len)))
        assert not selection.is_ragged
        assert bool((selection.indices == torch.tensor(expected, dtype=torch.int32)
                     .to(selection.indices.device)).all())


@pytest.mark.parametrize("scope", ["layer", "global"])
@given(scores=score_cases(), data=st.data())
def test_protection_around_head_budget_keeps_sinks_and_window_and_spends_the_same_budget(
        scope, scores, data, device):
    seq_len = scores.shape[-1]
    n_sink = data.draw(st.integers(0, min(4, seq_len)))
    n_recent = data.draw(st.integers(0, seq_len - n_sink))
    budget = data.draw(st.integers(max(1, n_sink + n_recent), seq_len))
    inner = get_policy("head_budget", scope=scope, alpha=0.2)
    policy = get_policy("sink_recent", n_sink=n_sink, n_recent=n_recent, inner=inner)
    _, mask = keep_mask(policy, scores, device, budget=budget)

    protected = ref.protected_positions_reference(seq_len, n_sink, n_recent)
    always = ref.protected_mask(scores, protected)
    assert not bool((always & ~mask).any()), "a protected position was dropped"
    inner_budgets = (budget - ref.protected_count(scores, protected)).tolist()
    expected = always | ref.head_budget_reference(ref.without(scores, protected), inner_budgets,
                                                  scope, 0.2)
    assert torch.equal(mask, expected)
    # Same budget in total: protection is paid for out of it, not added to it.
    pooled_dims = (2,) if scope == "layer" else (1, 2)
    heads_pooled = scores.shape[2] * (1 if scope == "layer" else scores.shape[1])
    assert torch.equal(mask.sum(-1).sum(pooled_dims),
                       valid_counts(scores).sum(pooled_dims).clamp(max=budget * heads_pooled))


def test_protect_is_the_same_policy_as_sink_recent_with_inner(device):
    scores = torch.randn(2, 3, 2, 40, generator=torch.Generator().manual_seed(1))
    inner = get_policy("head_budget", alpha=0.2)
    a = protect(inner, n_sink=4, n_recent=8).select(scores.to(device), budget=20)
    b = get_policy("sink_recent", n_sink=4, n_recent=8, inner=inner).select(scores.to(device),
                                                                            budget=20)
    assert torch.equal(a.to_mask(), b.to_mask())
    assert bool(a.to_mask()[..., :4].all()) and bool(a.to_mask()[..., -8:].all())


# ----------------------------------------------------------------------------------- pooled_window
@pytest.mark.parametrize("mode", ["max", "avg"])
@given(scores=score_cases(), kernel_size=st.sampled_from([1, 3, 5, 7]), data=st.data())
def test_pooled_window_matches_the_snapkv_oracle(mode, scores, kernel_size, data, device):
    seq_len = scores.shape[-1]
    window = data.draw(st.integers(0, seq_len))
    budget = data.draw(st.integers(max(1, window), seq_len))
    policy = get_policy("pooled_window", window=window, kernel_size=kernel_size, mode=mode,
                        impl="torch")
    _, mask = keep_mask(policy, scores, device, budget=budget)

    # Max pooling is exact, so the float64 oracle applies; average pooling can differ from it in
    # the last bit, which reorders near-ties, so the oracle pools with the torch op instead.
    def torch_pool(x, k, m):
        return pool_scores(x, k, mode=m, impl="torch")
    pool = ref.pool_scores_reference if mode == "max" else torch_pool
    assert torch.equal(mask, ref.pooled_window_reference(scores, budget, window, kernel_size, mode,
                                                         pool=pool))
    recent = ref.protected_positions_reference(seq_len, 0, window)
    assert not bool((ref.protected_mask(scores, recent) & ~mask).any())
    assert torch.equal(mask.sum(-1), valid_counts(scores).clamp(max=budget))


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_pooled_window_runs_the_triton_pooling_kernel(mode, device):
    scores = torch.randn(1, 2, 2, 37, generator=torch.Generator().manual_seed(3))
    scores[0, 1, 0, 3:7] = NEG_INF
    expected = get_policy("pooled_window", window=4, kernel_size=5, mode=mode, impl="torch") \
        .select(scores.to(device), budget=12).to_mask()
    triton = get_policy("pooled_window", window=4, kernel_size=5, mode=mode, impl="triton") \
        .select(scores.to(device), budget=12)
    triton.validate()
    chosen = ref.pool_scores_reference(ref.without(scores, list(range(33, 37))), 5, mode)
    # Tie-robust for avg (the two backends may round the pooled means differently).
    kept_scores = torch.where(triton.to_mask().cpu(), chosen, 0.0).sum(-1)
    expected_scores = torch.where(expected.cpu(), chosen, 0.0).sum(-1)
    assert_close(kept_scores, expected_scores, name="sum of the kept pooled scores")
    assert torch.equal(triton.counts(), expected.sum(-1))


def test_pooled_window_keeps_the_neighbours_of_a_peak(device):
    scores = torch.zeros(1, 1, 1, 20)
    scores[..., 8] = 10.0
    selection = get_policy("pooled_window", window=2, kernel_size=5, mode="max",
                           impl="torch").select(scores.to(device), budget=7)
    assert selection.indices.flatten().tolist() == [6, 7, 8, 9, 10, 18, 19]


# ----------------------------------------------------------------------------------- pyramid
@given(scores=score_cases(max_layers=5), beta=st.sampled_from([1.0, 2.0, 20.0]), data=st.data())
def test_pyramid_matches_the_pyramidkv_oracle_and_conserves_the_budget(scores, beta, data, device):
    budget = data.draw(st.integers(1, scores.shape[-1]))
    selection, mask = keep_mask(get_policy("pyramid", beta=beta), scores, device, budget=budget)
    expected, _ = ref.pyramid_reference(scores, budget, beta)
    assert torch.equal(mask, expected)
    assert selection.is_ragged and selection.budget == budget
    layers = scores.shape[1]
    assert torch.equal(mask.sum(-1).sum(1), valid_counts(scores).sum(1).clamp(max=budget * layers))
    assert_dominance(scores, mask)


def test_pyramid_budgets_shrink_linearly_with_depth(device):
    scores = torch.randn(1, 5, 2, 100, generator=torch.Generator().manual_seed(0))
    selection = get_policy("pyramid", beta=4.0).select(scores.to(device), budget=41)
    # weights 1.75, 1.375, 1, 0.625, 0.25 -> 71.75, 56.375, 41, 25.625, 10.25: the two missing
    # positions go to the largest remainders (layers 0 and 3).
    assert selection.counts()[0].tolist() == [[72, 72], [56, 56], [41, 41], [26, 26], [10, 10]]


def test_pyramid_passes_the_excess_of_a_full_layer_to_the_others(device):
    scores = torch.randn(1, 3, 1, 10, generator=torch.Generator().manual_seed(0))
    # weights 1.9, 1, 0.1 of budget 8 -> 15.2 > 10: layer 0 is full, 14 left for weights 1 : 0.1.
    selection = get_policy("pyramid", beta=10.0).select(scores.to(device), budget=8)
    assert selection.counts()[0].flatten().tolist() == [10, 10, 4]


def test_pyramid_around_protection_keeps_the_window_in_every_layer(device):
    scores = torch.randn(1, 4, 2, 30, generator=torch.Generator().manual_seed(0))
    policy = protect(get_policy("pyramid", beta=20.0), n_recent=4)
    selection = policy.select(scores.to(device), budget=8)
    mask = selection.to_mask()
    assert bool(mask[..., -4:].all())
    assert selection.total_kept == 8 * 4 * 2
    assert selection.counts()[0, :, 0].tolist() == sorted(selection.counts()[0, :, 0].tolist(),
                                                          reverse=True)


def test_pyramid_of_a_protected_policy_keeps_the_window_in_every_layer(device):
    scores = torch.randn(2, 6, 2, 50, generator=torch.Generator().manual_seed(2))
    policy = get_policy("pyramid", beta=20.0, inner=protect(get_policy("topk"), n_recent=5))
    selection = policy.select(scores.to(device), budget=10)
    selection.validate()
    assert bool(selection.to_mask()[..., -5:].all())
    # The deepest layer's share (10 / 20 = 0.5) is below the window: it keeps just the window.
    assert selection.counts()[:, -1].eq(5).all()
    assert selection.counts().sum(1).eq(10 * 6).all()


# ----------------------------------------------------------------------------------- threshold
@given(scores=score_cases(), tau=st.sampled_from([-1.0, 0.0, 0.5, 2.0]), data=st.data())
def test_threshold_keeps_exactly_the_scores_above_tau_plus_the_window(scores, tau, data, device):
    window = data.draw(st.integers(0, scores.shape[-1]))
    policy = get_policy("threshold", tau=tau, window=window)
    selection, mask = keep_mask(policy, scores, device)
    recent = ref.protected_positions_reference(scores.shape[-1], 0, window)
    assert torch.equal(mask, (scores > tau) | ref.protected_mask(scores, recent))
    assert selection.is_ragged
    assert selection.budget == pytest.approx(mask.sum(-1).double().mean().item())


@given(scores=score_cases(), tau=st.sampled_from([0.0, 1.0, 3.0]), data=st.data())
def test_threshold_per_head_minimum(scores, tau, data, device):
    seq_len = scores.shape[-1]
    window = data.draw(st.integers(0, seq_len))
    minimum = data.draw(st.integers(0, seq_len))
    policy = get_policy("threshold", tau=tau, min_per_head=minimum, window=window)
    _, mask = keep_mask(policy, scores, device)
    assert torch.equal(mask, ref.threshold_reference(scores, tau, minimum, window))
    chosen = mask.clone()
    chosen[..., ref.protected_positions_reference(seq_len, 0, window)] = False
    choosable = valid_counts(ref.without(scores, ref.protected_positions_reference(seq_len, 0,
                                                                                   window)))
    assert bool((chosen.sum(-1) >= choosable.clamp(max=minimum)).all())
    assert not bool(((scores > tau) & ~mask).any())


# ----------------------------------------------------------------------------------- all policies
ALL_POLICIES = [
    pytest.param("topk", {}, id="topk"),
    pytest.param("head_budget", {"scope": "layer"}, id="head_budget-layer"),
    pytest.param("head_budget", {"scope": "global"}, id="head_budget-global"),
    pytest.param("pooled_window", {"window": 2, "impl": "torch"}, id="pooled_window"),
    pytest.param("sink_recent", {"n_sink": 1, "n_recent": 1}, id="sink_recent"),
    pytest.param("pyramid", {"beta": 5.0}, id="pyramid"),
    pytest.param("threshold", {"tau": 0.0, "window": 1}, id="threshold"),
]


def budget_for(name, seq_len, data):
    return {} if name == "threshold" else {"budget": data.draw(st.integers(2, seq_len))}


@pytest.mark.parametrize("name, params", ALL_POLICIES)
@given(scores=score_cases(), data=st.data())
def test_results_do_not_depend_on_batch_position(name, params, scores, data, device):
    assume(scores.shape[-1] >= 2)
    policy = get_policy(name, **params)
    budget = budget_for(name, scores.shape[-1], data)
    _, mask = keep_mask(policy, scores, device, **budget)
    for b in range(scores.shape[0]):
        _, alone = keep_mask(policy, scores[b:b + 1].clone(), device, **budget)
        assert torch.equal(alone[0], mask[b])
    order = torch.randperm(scores.shape[0], generator=torch.Generator().manual_seed(0))
    _, shuffled = keep_mask(policy, scores[order].clone(), device, **budget)
    assert torch.equal(shuffled, mask[order])


@pytest.mark.parametrize("name, params", ALL_POLICIES)
@given(scores=score_cases(), data=st.data())
def test_strided_scores_give_the_same_selection_and_are_not_modified(name, params, scores, data,
                                                                     device):
    assume(scores.shape[-1] >= 2)
    policy = get_policy(name, **params)
    budget = budget_for(name, scores.shape[-1], data)
    view = data.draw(strided_views(scores)).to(device)
    before = view.clone()
    _, from_view = keep_mask(policy, view, device, **budget)
    _, from_contiguous = keep_mask(policy, scores, device, **budget)
    assert torch.equal(from_view, from_contiguous)
    assert torch.equal(view, before)


@pytest.mark.parametrize("name, params", [p for p in ALL_POLICIES if p.id != "threshold"])
def test_length_one_and_full_budget(name, params, device):
    scores = torch.tensor([[[[0.5]]], [[[NEG_INF]]]])
    # At most one protected position fits in T = 1.
    fits_in_one = {"sink_recent": {"n_sink": 0}, "pooled_window": {"window": 1}}
    params = {**params, **fits_in_one.get(name, {})}
    selection = get_policy(name, **params).select(scores.to(device), budget=1)
    selection.validate()
    assert selection.to_mask().cpu().flatten().tolist() == [True, False]
    full = torch.randn(2, 2, 2, 9)
    full[0, 0, 0, 4] = NEG_INF
    everything = get_policy(name, **params).select(full.to(device), budget=9).to_mask().cpu()
    assert torch.equal(everything, full > NEG_INF)
