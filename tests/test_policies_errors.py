"""Policy registry and bad input: every mistake raises before any work, with a message that names
the argument, what it got and what it needs."""

import pytest
import torch

from proxykv.policies import (
    Policy,
    available_policies,
    get_policy,
    protect,
    register_policy,
    top_count_mask,
    unregister_policy,
)

SCORES = torch.randn(1, 2, 2, 16, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------- registry
def test_the_shipped_policies_are_registered():
    assert {"topk", "head_budget", "pooled_window", "sink_recent", "pyramid",
            "threshold"} <= set(available_policies())
    assert available_policies() == sorted(available_policies())


def test_unknown_policy_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown policy 'snapkv'; available policies: .*"
                                         r"head_budget, .*topk"):
        get_policy("snapkv")


def test_unexpected_parameter_lists_the_accepted_ones():
    with pytest.raises(TypeError, match=r"policy 'head_budget' got unexpected parameter\(s\) "
                                        r"window; it takes: scope, alpha"):
        get_policy("head_budget", window=8)
    with pytest.raises(TypeError, match=r"it takes: \(no parameters\)"):
        get_policy("topk", alpha=0.1)


def test_a_custom_policy_registers_and_a_name_cannot_be_taken_twice(device):
    class KeepFirst(Policy):
        """Keeps the first `budget` positions (a toy)."""

        def keep_mask(self, scores, row_budget):
            positions = torch.arange(scores.shape[-1], device=scores.device)
            return (positions < row_budget.unsqueeze(-1)) & (scores > float("-inf"))

    register_policy("keep_first_test")(KeepFirst)
    try:
        assert "keep_first_test" in available_policies()
        selection = get_policy("keep_first_test").select(SCORES.to(device), budget=3)
        assert selection.indices[0, 0, 0].tolist() == [0, 1, 2]
        with pytest.raises(ValueError, match="'keep_first_test' is already registered"):
            register_policy("keep_first_test")(lambda: KeepFirst())
    finally:
        unregister_policy("keep_first_test")
    assert "keep_first_test" not in available_policies()


# ----------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("budget_args, error, message", [
    pytest.param({"keep_ratio": 0.0}, ValueError, r"keep_ratio must be a finite float in \(0, 1\] \(the fraction of positions kept\), got 0.0",
                 id="ratio-zero"),
    pytest.param({"keep_ratio": -0.5}, ValueError, r"keep_ratio must be a finite float in \(0, 1\].*got -0.5",
                 id="ratio-negative"),
    pytest.param({"keep_ratio": 1.5}, ValueError, r"keep_ratio must be a finite float in \(0, 1\].*got 1.5",
                 id="ratio-above-one"),
    pytest.param({"keep_ratio": float("nan")}, ValueError, r"keep_ratio must be a finite float in \(0, 1\]",
                 id="ratio-nan"),
    pytest.param({"keep_ratio": "0.5"}, TypeError, r"keep_ratio must be a float.*got str",
                 id="ratio-str"),
    pytest.param({}, ValueError, r"needs exactly one of keep_ratio and budget, got neither",
                 id="neither"),
    pytest.param({"keep_ratio": 0.5, "budget": 4}, ValueError,
                 r"exactly one of keep_ratio and budget, got both \(keep_ratio=0.5, budget=4\)",
                 id="both"),
    pytest.param({"budget": 17}, ValueError, r"budget must be <= T=16 .*got 17",
                 id="budget-over-T"),
    pytest.param({"budget": 0}, ValueError, r"budget must be >= 1 .*got 0", id="budget-zero"),
    pytest.param({"budget": 4.0}, TypeError, r"budget must be an int .*got float 4.0",
                 id="budget-float"),
    pytest.param({"budget": True}, TypeError, r"budget must be an int .*got bool",
                 id="budget-bool"),
])
@pytest.mark.parametrize("name, params", [
    pytest.param("topk", {}, id="topk"),
    pytest.param("head_budget", {}, id="head_budget"),
    pytest.param("pyramid", {}, id="pyramid"),
    pytest.param("pooled_window", {"window": 2}, id="pooled_window"),
    pytest.param("sink_recent", {}, id="sink_recent"),
])
def test_bad_budget_arguments(name, params, budget_args, error, message):
    with pytest.raises(error, match=message):
        get_policy(name, **params).select(SCORES, **budget_args)


@pytest.mark.parametrize("budget_args", [{"budget": 4}, {"keep_ratio": 0.5}])
def test_threshold_takes_neither_budget_nor_keep_ratio(budget_args):
    with pytest.raises(ValueError, match=r"chooses its own budget from the scores: pass neither"):
        get_policy("threshold", tau=0.0).select(SCORES, **budget_args)


def test_a_budget_smaller_than_the_protected_set_is_refused():
    policy = get_policy("sink_recent", n_sink=4, n_recent=8, inner=get_policy("topk"))
    with pytest.raises(ValueError, match=r"budget=11 is smaller than the 12 positions per head "
                                         r"that Protected\(n_sink=4, n_recent=8"):
        policy.select(SCORES, budget=11)
    with pytest.raises(ValueError,
                       match=r"budget=8 \(from keep_ratio=0.5\) is smaller than the 12"):
        policy.select(SCORES, keep_ratio=0.5)
    with pytest.raises(ValueError, match=r"is smaller than the 32 positions per head that "
                                         r"RecentWindow\(window=32, inner=Pooled"):
        get_policy("pooled_window", window=32).select(torch.zeros(1, 1, 1, 40), budget=20)
    assert policy.select(SCORES, budget=12).indices.shape[-1] == 12


def test_a_protected_set_larger_than_t_is_refused():
    with pytest.raises(ValueError, match=r"window=20 protected positions exceed the T=16 "
                                         r"positions"):
        get_policy("threshold", tau=0.0, window=20).select(SCORES)
    with pytest.raises(ValueError, match=r"window=20 protected positions exceed the T=16 "
                                         r"positions"):
        get_policy("pooled_window", window=20).select(SCORES, budget=16)
    with pytest.raises(ValueError, match=r"n_sink=10 \+ n_recent=10 protected positions exceed"):
        get_policy("sink_recent", n_sink=10, n_recent=10).select(SCORES, budget=16)
    with pytest.raises(ValueError, match=r"min_per_head=17 exceeds the T=16 positions"):
        get_policy("threshold", tau=0.0, min_per_head=17).select(SCORES)


# ----------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("scores, error, message", [
    pytest.param(torch.zeros(2, 2, 16), ValueError,
                 r"scores must be a 4-D tensor \[B, L, H_kv, T\], got shape \(2, 2, 16\)",
                 id="rank-3"),
    pytest.param(torch.zeros(1, 1, 2, 2, 16), ValueError, r"scores must be a 4-D tensor",
                 id="rank-5"),
    pytest.param(torch.zeros(1, 2, 2, 16, dtype=torch.float16), TypeError,
                 r"scores must be float32 or float64, got torch.float16", id="float16"),
    pytest.param(torch.zeros(1, 2, 2, 16, dtype=torch.int64), TypeError,
                 r"scores must be float32 or float64, got torch.int64", id="int64"),
    pytest.param([[[[0.0]]]], TypeError, r"scores must be a torch.Tensor, got list", id="list"),
    pytest.param(torch.zeros(0, 2, 2, 16), ValueError,
                 r"scores must have B >= 1, got shape "
                 r"\(0, 2, 2, 16\)", id="empty-B"),
    pytest.param(torch.zeros(1, 2, 2, 0), ValueError,
                 r"scores must have at least one position \(T >= 1\)", id="empty-T"),
    pytest.param(torch.tensor([[[[0.0, float("nan"), 1.0]]]]), ValueError,
                 r"scores must hold no NaN \(use -inf for invalid positions\); found nan at "
                 r"position \[0, 0, 0, 1\] of shape \(1, 1, 1, 3\)", id="nan"),
    pytest.param(torch.zeros(1, 2, 2, 16, device="meta"), ValueError,
                 r"scores must be on a CPU or CUDA device, got meta", id="meta"),
])
def test_bad_scores(scores, error, message):
    with pytest.raises(error, match=message):
        get_policy("topk").select(scores, budget=1)


# ----------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("name, params, error, message", [
    pytest.param("head_budget", {"scope": "head"}, ValueError,
                 r"scope must be one of 'layer' or 'global', got 'head'", id="scope"),
    pytest.param("head_budget", {"alpha": 1.5}, ValueError, r"alpha must be a finite float in \[0, 1\].*"
                 r"got 1.5", id="alpha-high"),
    pytest.param("head_budget", {"alpha": -0.1}, ValueError, r"alpha must be a finite float in \[0, 1\]",
                 id="alpha-negative"),
    pytest.param("head_budget", {"alpha": "0.2"}, TypeError, r"alpha must be a float, got str",
                 id="alpha-str"),
    pytest.param("pooled_window", {"kernel_size": 4}, ValueError, r"kernel_size must be odd",
                 id="kernel-even"),
    pytest.param("pooled_window", {"mode": "min"}, ValueError,
                 r"mode must be one of 'max' or 'avg', got 'min'", id="mode"),
    pytest.param("pooled_window", {"window": -1}, ValueError, r"^window must be >= 0, got -1",
                 id="window-negative"),
    pytest.param("pooled_window", {"window": 2.0}, TypeError, r"^window must be an int, got float",
                 id="window-float"),
    pytest.param("threshold", {"tau": 0.0, "window": -4}, ValueError,
                 r"^window must be >= 0, got -4", id="threshold-window-negative"),
    pytest.param("pooled_window", {"impl": "cuda"}, ValueError,
                 r"impl must be one of 'triton', 'torch' or None, got 'cuda'", id="impl"),
    pytest.param("pooled_window", {"inner": "topk"}, TypeError,
                 r"inner must be a Policy \(e.g. get_policy\('topk'\)\), got str", id="inner-str"),
    pytest.param("sink_recent", {"n_sink": -1}, ValueError, r"n_sink must be >= 0, got -1",
                 id="sink-negative"),
    pytest.param("sink_recent", {"n_sink": 2.5}, TypeError, r"n_sink must be an int, got float",
                 id="sink-float"),
    pytest.param("pyramid", {"beta": 0.5}, ValueError, r"beta must be a finite float >= 1.*got 0.5",
                 id="beta-low"),
    pytest.param("pyramid", {"beta": float("inf")}, ValueError, r"beta must be a finite float",
                 id="beta-inf"),
    pytest.param("threshold", {"tau": float("nan")}, ValueError,
                 r"tau must be a finite float .*got nan", id="tau-nan"),
    pytest.param("threshold", {"tau": None}, TypeError, r"tau must be a float, got NoneType",
                 id="tau-none"),
    pytest.param("threshold", {"tau": 0.0, "min_per_head": -2}, ValueError,
                 r"min_per_head must be >= 0, got -2", id="minimum-negative"),
    pytest.param("threshold", {"tau": 0.0, "window": 1.5}, TypeError,
                 r"window must be an int, got float", id="threshold-window-float"),
])
def test_bad_parameters_are_refused_at_construction(name, params, error, message):
    with pytest.raises(error, match=message):
        get_policy(name, **params)


def test_threshold_needs_tau():
    with pytest.raises(TypeError, match=r"policy 'threshold' needs parameter\(s\) tau"):
        get_policy("threshold")


def test_a_wrapper_that_reallocates_a_budget_refuses_an_adaptive_inner_policy():
    with pytest.raises(ValueError, match=r"inner of Pyramid must spend a budget, got "
                                         r"Threshold\(tau=0.0, min_per_head=0\)"):
        get_policy("pyramid", inner=get_policy("threshold", tau=0.0))


def test_protect_checks_its_arguments():
    with pytest.raises(TypeError, match=r"inner must be a Policy"):
        protect("topk", n_sink=4)
    with pytest.raises(ValueError, match=r"n_recent must be >= 0, got -3"):
        protect(get_policy("topk"), n_recent=-3)


@pytest.mark.parametrize("make_policy, shown", [
    pytest.param(lambda: get_policy("pooled_window", window=8, kernel_size=3),
                 "RecentWindow(window=8, inner=Pooled(kernel_size=3", id="pooled_window"),
    pytest.param(lambda: get_policy("threshold", tau=0.5, window=3),
                 "RecentWindow(window=3, inner=Threshold(tau=0.5", id="threshold"),
    pytest.param(lambda: get_policy("sink_recent", n_sink=2, n_recent=3),
                 "Protected(n_sink=2, n_recent=3, inner=Recency", id="sink_recent"),
])
def test_a_policy_shows_the_parameters_it_was_built_with(make_policy, shown):
    assert repr(make_policy()).startswith(shown)


@pytest.mark.parametrize("rows, counts, error, message", [
    pytest.param(torch.zeros(2, 5, device="meta"), torch.ones(2, dtype=torch.int64, device="meta"),
                 ValueError, "rows must be on a CPU or CUDA device, got meta", id="meta"),
    pytest.param(torch.zeros(2, 5, dtype=torch.float16), torch.ones(2, dtype=torch.int64),
                 TypeError, "rows must be float32 or float64, got torch.float16", id="fp16"),
    pytest.param(torch.zeros(2, 5), torch.ones(3, dtype=torch.int64), ValueError,
                 r"counts must have shape \[R\] = \(2,\), got \(3,\)", id="counts-shape"),
    pytest.param(torch.zeros(2, 5), torch.ones(2), TypeError,
                 "counts must be int32 or int64, got torch.float32", id="counts-float"),
    pytest.param(torch.zeros(2, 5), torch.tensor([1, -1]), ValueError,
                 r"counts must be >= 0, got a minimum of -1", id="counts-negative"),
    pytest.param(torch.zeros(0, 5), torch.ones(0, dtype=torch.int64), ValueError,
                 r"rows must have R >= 1", id="empty"),
])
def test_top_count_mask_checks_its_arguments(rows, counts, error, message):
    with pytest.raises(error, match=message):
        top_count_mask(rows, counts)


def test_top_count_mask_reads_float64_rows_as_float32():
    rows = torch.tensor([[1.0, float("inf"), 3.0, float("-inf")]], dtype=torch.float64)
    assert top_count_mask(rows, torch.tensor([2])).tolist() == [[False, True, True, False]]
