"""Top-k recall at keep ratios and per-head Spearman, against hand-built cases and naive Python."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from proxykv.align import per_head_spearman, topk_recall

NEG_INF = float("-inf")


def row(values):
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)


def test_recall_counts_the_teachers_top_k_among_the_predictions():
    teacher = row(range(10))                         # top-3: positions 9, 8, 7
    pred = row([9, 0, 0, 0, 0, 0, 0, 1, 8, 7.5])     # top-3: positions 0, 8, 9
    assert topk_recall(pred, teacher, (0.3,)) == {0.3: pytest.approx(2 / 3)}
    assert topk_recall(teacher, teacher, (0.1, 0.3, 0.5)) == {0.1: 1.0, 0.3: 1.0, 0.5: 1.0}


def test_keep_counts_round_up_with_at_least_one():
    teacher = row(range(7))  # 0.1 * 7 = 0.7 -> k = 1; 0.5 * 7 = 3.5 -> k = 4
    pred = row([0, 1, 2, 3, 4, 5, -1])  # misses the teacher's best (position 6)
    recall = topk_recall(pred, teacher, (0.1, 0.5))
    assert recall[0.1] == 0.0 and recall[0.5] == pytest.approx(3 / 4)
    teacher10 = row(range(10))  # 0.3 * 10 must give k = 3, not 4 from float rounding
    pred10 = row([0, 0, 0, 0, 0, 0, 5, 1, 1, 1])
    assert topk_recall(pred10, teacher10, (0.3,))[0.3] == pytest.approx(2 / 3)


def test_ties_in_the_teacher_never_cost_recall():
    teacher = row([5, 5, 5, 1, 0, 0])
    for choice in range(3):
        pred = torch.zeros(1, 1, 1, 6)
        pred[..., choice] = 1.0
        assert topk_recall(pred, teacher, (1 / 6,))[1 / 6] == 1.0


def test_invalid_teacher_positions_can_neither_be_kept_nor_counted():
    teacher = row([NEG_INF, 3, 2, 1, NEG_INF])  # 3 valid -> k = 1 at 0.3
    pred = row([100, 1, 0, 0, 100])              # would pick an invalid position if allowed
    assert topk_recall(pred, teacher, (0.3,))[0.3] == 1.0


def test_global_scope_shares_one_budget_across_heads():
    teacher = torch.tensor([[[[9.0, 8, 7, 6], [1, 0, -1, -2]]]])  # [1, 1, 2, 4]
    pred_head_level = torch.tensor([[[[1.0, 2, 3, 4], [9, 8, 7, 6]]]])
    # Per head the prediction is reversed on head 0 and perfect on head 1; globally it gives the
    # whole budget to the wrong head.
    head = topk_recall(pred_head_level, teacher, (0.5,), scope="head", reduction="none")[0.5]
    assert head.tolist() == [[[0.0, 1.0]]]
    assert topk_recall(pred_head_level, teacher, (0.5,), scope="global")[0.5] == 0.0
    assert topk_recall(teacher, teacher, (0.5,), scope="global")[0.5] == 1.0


def test_reduction_none_gives_nan_for_rows_without_valid_tokens():
    teacher = torch.randn(2, 2, 3, 8)
    teacher[1, 0, 2] = NEG_INF
    per_row = topk_recall(teacher, teacher, (0.3,), reduction="none")[0.3]
    assert per_row.shape == (2, 2, 3) and math.isnan(per_row[1, 0, 2])
    assert (per_row[~per_row.isnan()] == 1.0).all()
    assert topk_recall(teacher, teacher, (0.3,))[0.3] == 1.0


def naive_recall(pred, teacher, ratio):
    """Per row: k = max(1, ceil(ratio * n)); hits = predicted picks whose teacher score is at
    least the teacher's k-th largest (ties broken towards earlier positions on the pred side)."""
    out = []
    for p, t in zip(pred.reshape(-1, pred.shape[-1]).tolist(),
                    teacher.reshape(-1, teacher.shape[-1]).tolist()):
        valid = [i for i, v in enumerate(t) if v != NEG_INF]
        if not valid:
            out.append(math.nan)
            continue
        k = max(1, math.ceil(round(ratio * len(valid), 9)))
        threshold = sorted((t[i] for i in valid), reverse=True)[k - 1]
        picks = sorted(valid, key=lambda i: (-p[i], i))[:k]
        out.append(sum(t[i] >= threshold for i in picks) / k)
    return torch.tensor(out).view(pred.shape[:3])


@given(seed=st.integers(0, 2**20), length=st.integers(1, 60),
       ratio=st.sampled_from([0.1, 0.3, 0.5, 1 / 3, 1.0]))
def test_recall_matches_a_naive_python_reference(seed, length, ratio):
    generator = torch.Generator().manual_seed(seed)
    teacher = (torch.randn(2, 2, 2, length, generator=generator) * 2).round()  # many ties
    teacher[torch.rand(teacher.shape, generator=generator) < 0.2] = NEG_INF
    pred = (torch.randn(2, 2, 2, length, generator=generator) * 2).round()
    actual = topk_recall(pred, teacher, (ratio,), reduction="none")[ratio]
    expected = naive_recall(pred, teacher, ratio)
    assert torch.equal(actual.isnan(), expected.isnan())
    assert torch.allclose(actual[~actual.isnan()], expected[~expected.isnan()])


def naive_spearman(pred, teacher):
    out = []
    for p, t in zip(pred.reshape(-1, pred.shape[-1]).tolist(),
                    teacher.reshape(-1, teacher.shape[-1]).tolist()):
        keep = [i for i in range(len(p)) if p[i] != NEG_INF and t[i] != NEG_INF]
        if len(keep) < 2:
            out.append(math.nan)
            continue
        ranks = []
        for values in ([p[i] for i in keep], [t[i] for i in keep]):
            ranks.append([sum(w < v for w in values) + (sum(w == v for w in values) - 1) / 2
                          for v in values])
        a, b = np.array(ranks[0]), np.array(ranks[1])
        out.append(math.nan if a.std() == 0 or b.std() == 0 else float(np.corrcoef(a, b)[0, 1]))
    return torch.tensor(out, dtype=torch.float32).view(pred.shape[:3])


@given(seed=st.integers(0, 2**20), length=st.integers(1, 40))
def test_spearman_matches_a_naive_reference(seed, length):
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(2, 1, 3, length, generator=generator).round()
    pred = teacher + torch.randn(2, 1, 3, length, generator=generator).round()
    teacher[torch.rand(teacher.shape, generator=generator) < 0.15] = NEG_INF
    pred[torch.rand(pred.shape, generator=generator) < 0.15] = NEG_INF
    actual, expected = per_head_spearman(pred, teacher), naive_spearman(pred, teacher)
    assert torch.equal(actual.isnan(), expected.isnan())
    assert torch.allclose(actual[~actual.isnan()], expected[~expected.isnan()], atol=1e-5)


def test_spearman_is_one_for_monotone_copies_and_minus_one_reversed():
    teacher = torch.randn(1, 2, 2, 30)
    assert torch.allclose(per_head_spearman(teacher.exp(), teacher), torch.ones(1, 2, 2))
    assert torch.allclose(per_head_spearman(-teacher, teacher), -torch.ones(1, 2, 2))


def test_spearman_is_nan_where_undefined():
    teacher = torch.randn(1, 1, 3, 5)
    pred = teacher.clone()
    pred[0, 0, 0] = 2.0                     # constant prediction
    teacher[0, 0, 1, 1:] = NEG_INF          # one valid token
    result = per_head_spearman(pred, teacher)
    assert result[0, 0, :2].isnan().all() and result[0, 0, 2] == pytest.approx(1.0)


@pytest.mark.parametrize("call", [
    pytest.param(lambda p, t: topk_recall(p, t), id="recall"),
    pytest.param(per_head_spearman, id="spearman"),
])
def test_bad_metric_inputs_raise(call):
    with pytest.raises(ValueError, match=r"pred and teacher must have the same shape"):
        call(torch.zeros(1, 1, 2, 4), torch.zeros(1, 2, 1, 4))
    with pytest.raises(TypeError, match=r"teacher must be float32 or float64, got "
                                        r"torch.float16"):
        call(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4, dtype=torch.float16))


def test_bad_recall_options_raise():
    scores = torch.zeros(1, 1, 1, 4)
    with pytest.raises(ValueError, match=r"each keep_ratios entry must be a finite float in \(0, 1\] "
                       r"\(the fraction of positions kept\), got 0.0"):
        topk_recall(scores, scores, (0.0,))
    with pytest.raises(ValueError, match=r"scope must be one of 'head' or 'global', got 'layer'"):
        topk_recall(scores, scores, scope="layer")
