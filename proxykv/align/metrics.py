"""How well predicted scores reproduce the teacher's choices: top-k recall at keep ratios and
per-head Spearman correlation.

Both take ``pred`` and ``teacher`` ``[B, L, H, T]`` (larger = keep, ``-inf`` = invalid; float32,
or float64 read as float32; checked like the loss inputs, see ``proxykv.align.losses``). The
teacher's valid positions define what can be kept.
"""

from __future__ import annotations

import torch

from proxykv._validation import check_choice
from proxykv.align._ranking import (
    budget_sizes,
    check_keep_ratios,
    descending_ranks,
    kth_largest,
    row_mean_std,
)
from proxykv.align.base import NEG_INF, check_score_pair

RECALL_SCOPES = ("head", "global")
DEFAULT_KEEP_RATIOS = (0.1, 0.3, 0.5)


@torch.no_grad()
def topk_recall(pred: torch.Tensor, teacher: torch.Tensor, keep_ratios=DEFAULT_KEEP_RATIOS, *,
                scope: str = "head", reduction: str = "mean") -> dict[float, float | torch.Tensor]:
    """Fraction of the prediction's top-k that the teacher's top-k also holds.

    ``scope="head"``: each ``(b, l, h)`` row keeps ``k = max(1, ceil(ratio * n))`` of its ``n``
    teacher-valid tokens (per-head budgets). ``scope="global"``: each sample keeps ``k`` of all its
    valid entries across layers and heads (one shared budget; this needs scores comparable across
    heads). The prediction's top-k is taken among teacher-valid positions (a prediction of ``-inf``
    there ranks last; its ties go to the earlier position); a pick counts as a hit when its teacher
    score is at least the teacher's ``k``-th largest, so ties in the teacher never cost recall.

    Returns ``{ratio: recall}``: with ``reduction="mean"`` the mean over rows with a valid entry
    (NaN if none); with ``"none"`` a float32 tensor ``[B, L, H]`` (head) or ``[B]`` (global), NaN
    for rows without valid entries.
    """
    pred, teacher = check_score_pair(pred, teacher, "teacher")
    check_choice("scope", scope, RECALL_SCOPES)
    check_choice("reduction", reduction, ("mean", "none"))
    ratios = check_keep_ratios(keep_ratios)
    row_shape = pred.shape[:3] if scope == "head" else pred.shape[:1]
    width = pred.shape[-1] if scope == "head" else pred[0].numel()
    pred_rows = pred.reshape(-1, width)
    teacher_rows = teacher.reshape(-1, width)
    valid = teacher_rows != NEG_INF
    count = valid.sum(dim=-1)
    order = torch.where(valid, pred_rows, NEG_INF).argsort(dim=-1, descending=True, stable=True)
    pred_rank = torch.zeros_like(order).scatter_(
        -1, order, torch.arange(width, device=order.device).expand_as(order).contiguous())
    keeps = [budget_sizes(count, ratio) for ratio in ratios]
    thresholds = kth_largest(teacher_rows, valid, keeps)
    results: dict[float, float | torch.Tensor] = {}
    for ratio, keep, threshold in zip(ratios, keeps, thresholds):
        hits = valid & (pred_rank < keep[:, None]) & (teacher_rows >= threshold)
        recall = hits.sum(dim=-1).float() / keep.float()
        recall = torch.where(count > 0, recall, float("nan")).view(row_shape)
        results[ratio] = recall if reduction == "none" else float(recall.nanmean())
    return results


@torch.no_grad()
def per_head_spearman(pred: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation between ``pred`` and ``teacher`` over the tokens of each
    ``(b, l, h)`` row, on positions valid in both (ties get average ranks). Float32 ``[B, L, H]``;
    NaN where a row has fewer than two such positions or either side is constant on them."""
    pred, teacher = check_score_pair(pred, teacher, "teacher")
    length = pred.shape[-1]
    pred_rows, teacher_rows = pred.reshape(-1, length), teacher.reshape(-1, length)
    valid = (pred_rows != NEG_INF) & (teacher_rows != NEG_INF)
    pred_ranks = descending_ranks(pred_rows, valid)
    teacher_ranks = descending_ranks(teacher_rows, valid)
    pred_mean, pred_std = row_mean_std(pred_ranks, valid)
    teacher_mean, teacher_std = row_mean_std(teacher_ranks, valid)
    count = valid.sum(dim=-1, keepdim=True)
    covariance = torch.where(valid, (pred_ranks - pred_mean) * (teacher_ranks - teacher_mean),
                             0.0).sum(dim=-1, keepdim=True) / count.clamp_min(1)
    defined = (count >= 2) & (pred_std > 0) & (teacher_std > 0)
    correlation = torch.where(defined, covariance / (pred_std * teacher_std), float("nan"))
    return correlation.view(pred.shape[:3])
