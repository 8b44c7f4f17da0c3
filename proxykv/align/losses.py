"""The multi-granularity hybrid loss: regression on normalised log-scores plus ranking terms at the
token, block and head levels. Each term is a function usable alone; ``MultiGranularityLoss`` sums
them with configurable weights.

All terms take ``pred`` and ``target`` ``[B, L, H, T]`` (target = the teacher's scores; float32,
or float64 read as float32; every dimension >= 1; one CPU or CUDA device) and use only positions
valid (``!= -inf``) in both; gradients stay finite with ``-inf`` entries. A wrong dtype raises
``TypeError``; a wrong shape, an empty dimension or a ``meta`` tensor ``ValueError``. The values are
not read for checks (that would cost a device sync per training step): NaN propagates.
Their scale conventions:

* ``pred`` enters through per-row (token, block) or per-sample (regression, budget) standardisation,
  so every term is invariant to a positive affine change of the prediction;
* the three ranking terms read the teacher only through the order of its values (ties included),
  so they are invariant to any strictly increasing transform of the teacher's scores (log-scores or
  attention mass give the same loss);
* each ranking term is 0 (token, block: exactly, when the prediction is an increasing affine
  function of the teacher's rank) or minimal (among all re-orderings of the same prediction values)
  when the prediction ranks like the teacher, and grows as the orders disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from proxykv._validation import check_float, check_int
from proxykv.align._ranking import (
    budget_sizes,
    check_keep_ratios,
    descending_ranks,
    kth_largest,
    row_mean_std,
    standardise_rows,
)
from proxykv.align.base import NEG_INF, check_score_pair, check_score_tensor

_MASKED_LOGIT = -1e30  # finite, so a fully masked row softmaxes to finite numbers, not NaN


def _check_temperature(name: str, value) -> float:
    return check_float(name, value, minimum=0.0, exclusive_minimum=True)


def _mean_over(values: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``used``; 0 (still differentiable) when nothing is used."""
    return torch.where(used, values, 0.0).sum() / used.sum().clamp_min(1)


def _masked_log_softmax(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, logits, _MASKED_LOGIT).log_softmax(dim=-1)


def _valid_both(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred != NEG_INF) & (target != NEG_INF)


@dataclass
class RankTarget:
    """The teacher's side of a listwise ranking term over rows ``[..., X]``: the log of the
    rank-based distribution ``p``, the spread (std) of its logits per row, and validity."""

    log_p: torch.Tensor
    spread: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def from_scores(cls, target: torch.Tensor, valid: torch.Tensor,
                    temperature: float) -> RankTarget:
        """``p ∝ exp(-rank / (temperature * n))`` per row (rank 0 = largest, ties averaged; ``n``
        valid entries), so the top ``temperature`` fraction of a row holds most of the mass."""
        count = valid.sum(dim=-1, keepdim=True).clamp_min(1)
        logits = torch.where(valid, -descending_ranks(target, valid) / (temperature * count), 0.0)
        return cls(_masked_log_softmax(logits, valid), row_mean_std(logits, valid)[1], valid)

    def apply(self, change) -> RankTarget:
        return RankTarget(change(self.log_p), change(self.spread), change(self.valid))


def _rank_kl(pred: torch.Tensor, target: RankTarget) -> torch.Tensor:
    """KL(p || q) per row, ``q`` = softmax of the row-standardised prediction times the teacher's
    logit spread (so a prediction that is an increasing affine function of the teacher's rank gives
    KL = 0); mean over rows with at least two valid entries."""
    log_q = _masked_log_softmax(standardise_rows(pred, target.valid) * target.spread, target.valid)
    kl = torch.where(target.valid, target.log_p.exp() * (target.log_p - log_q), 0.0).sum(dim=-1)
    return _mean_over(kl, target.valid.sum(dim=-1) >= 2)


def _block_max(rows: torch.Tensor, valid: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[..., T]`` -> ``[..., ceil(T / block_size)]``: maxima over each block's valid entries
    (``-inf`` for a block without any)."""
    padding = (-rows.shape[-1]) % block_size
    masked = F.pad(torch.where(valid, rows, NEG_INF), (0, padding), value=NEG_INF)
    return masked.view(*rows.shape[:-1], -1, block_size).amax(dim=-1)


def _block_target(target: torch.Tensor, valid: torch.Tensor, block_size: int,
                  temperature: float) -> RankTarget:
    blocks = _block_max(target, valid, block_size)
    return RankTarget.from_scores(blocks, blocks != NEG_INF, temperature)


def _teacher_shares(target: torch.Tensor, valid: torch.Tensor,
                    ratios: tuple[float, ...]) -> torch.Tensor:
    """``[N, C, T]`` -> ``[N, len(ratios), C]``: each channel's share of the sample's entries at or
    above the sample's ``k``-th largest valid value (ties all count)."""
    samples = target.shape[0]
    flat_valid = valid.reshape(samples, -1)
    keeps = [budget_sizes(flat_valid.sum(dim=-1), ratio) for ratio in ratios]
    shares = []
    for threshold in kth_largest(target.reshape(samples, -1), flat_valid, keeps):
        kept = (valid & (target >= threshold[:, :, None])).sum(dim=-1).float()
        shares.append(kept / kept.sum(dim=-1, keepdim=True).clamp_min(1))
    return torch.stack(shares, dim=1)


_THRESHOLD_SAMPLE = 1 << 16


def _soft_budget_share(pred: torch.Tensor, valid: torch.Tensor, teacher_shares: torch.Tensor,
                       ratios: tuple[float, ...], temperature: float) -> torch.Tensor:
    """Total variation between the prediction's soft shares (from ``[N, C, T]``) and
    ``teacher_shares`` ``[N, len(ratios), C]``, averaged over ratios and samples."""
    samples = pred.shape[0]
    flat_valid = valid.reshape(samples, -1)
    standardised = standardise_rows(pred.reshape(samples, -1), flat_valid).view(pred.shape)
    # The thresholds are constants of the soft counts; on long samples they are taken from evenly
    # strided entries, because selecting among millions of entries would dominate a training step.
    stride = -(-flat_valid.shape[-1] // _THRESHOLD_SAMPLE)
    sampled_valid = flat_valid[:, ::stride]
    count, sampled_count = flat_valid.sum(dim=-1), sampled_valid.sum(dim=-1)
    keeps = [(budget_sizes(count, ratio) * sampled_count + count - 1) // count.clamp_min(1)
             for ratio in ratios]
    thresholds = kth_largest(standardised.detach().reshape(samples, -1)[:, ::stride],
                             sampled_valid, keeps)
    total = pred.new_zeros(samples)
    for index, threshold in enumerate(thresholds):
        soft = torch.sigmoid((standardised - threshold[:, :, None]) / temperature)
        soft = torch.where(valid, soft, 0.0).sum(dim=-1)
        share = soft / soft.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        total = total + 0.5 * (share - teacher_shares[:, index]).abs().sum(dim=-1)
    return _mean_over(total / len(ratios), count >= 1)


def _regression(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    samples = pred.shape[0]
    valid = valid.reshape(samples, -1)
    pred_flat = standardise_rows(pred.reshape(samples, -1), valid)
    target_flat = standardise_rows(target.reshape(samples, -1), valid)
    count = valid.sum(dim=-1)
    squared = torch.where(valid, (pred_flat - target_flat).square(), 0.0).sum(dim=-1)
    return _mean_over(squared / count.clamp_min(1), count >= 1)


def regression_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the per-sample standardised log-scores (one mean and standard
    deviation over all valid entries of a sample, so head and layer levels are kept), averaged over
    valid positions and then over samples. Invariant to a positive affine change of either side."""
    pred, target = check_score_pair(pred, target, "target")
    return _regression(pred, target, _valid_both(pred, target))


def token_rank_loss(pred: torch.Tensor, target: torch.Tensor, *,
                    temperature: float = 0.1) -> torch.Tensor:
    """Listwise ranking of the tokens of each ``(b, l, h)`` row: KL from a distribution over the
    teacher's ranks (``temperature`` = fraction of the row, from the top, that holds most of the
    mass) to the softmax of the row-standardised prediction. Mean over rows with >= 2 valid
    tokens."""
    pred, target = check_score_pair(pred, target, "target")
    temperature = _check_temperature("temperature", temperature)
    return _rank_kl(pred, RankTarget.from_scores(target, _valid_both(pred, target), temperature))


def block_rank_loss(pred: torch.Tensor, target: torch.Tensor, *, block_size: int = 32,
                    temperature: float = 0.1) -> torch.Tensor:
    """``token_rank_loss`` on blocks: each row is cut into blocks of ``block_size`` tokens (the last
    one may be shorter), each block scored by its largest valid entry, on both sides (the maximum
    commutes with increasing transforms, so the teacher is still read through its order only).
    Blocks without valid entries are skipped."""
    pred, target = check_score_pair(pred, target, "target")
    check_int("block_size", block_size, minimum=1)
    temperature = _check_temperature("temperature", temperature)
    valid = _valid_both(pred, target)
    return _rank_kl(_block_max(pred, valid, block_size),
                    _block_target(target, valid, block_size, temperature))


def budget_share_loss(pred: torch.Tensor, target: torch.Tensor, *,
                      keep_ratios=(0.1, 0.3, 0.5), temperature: float = 0.1) -> torch.Tensor:
    """Head/layer level: under a global budget (keep ``keep_ratio`` of all valid entries of a
    sample, across every layer and head), the share of the budget each ``(l, h)`` would receive
    should match the teacher's. The teacher's shares count its entries at or above its ``k``-th
    largest value; the prediction's are soft counts ``sigmoid((s - s_k) / temperature)`` of the
    per-sample standardised prediction ``s`` around its own ``k``-th largest value ``s_k`` (a
    constant; for samples of more than 65,536 entries taken from evenly strided entries).
    Loss: total variation ``0.5 * sum |share_pred - share_teacher|`` (in [0, 1]), averaged over
    keep ratios and samples. Layer shares are sums of head shares."""
    pred, target = check_score_pair(pred, target, "target")
    ratios = check_keep_ratios(keep_ratios)
    temperature = _check_temperature("temperature", temperature)
    samples, length = pred.shape[0], pred.shape[-1]
    pred_rows, target_rows = pred.reshape(samples, -1, length), target.reshape(samples, -1, length)
    valid = _valid_both(pred_rows, target_rows)
    return _soft_budget_share(pred_rows, valid, _teacher_shares(target_rows, valid, ratios),
                              ratios, temperature)


@dataclass
class TeacherTargets:
    """The teacher's side of a ``MultiGranularityLoss`` for ``N`` samples (from its ``prepare``):
    computed once per training sample rather than at every step, since ranks and budget thresholds
    need sorts. ``valid`` and the rank targets are laid out ``[N, L*H, ...]``; terms with weight 0
    hold None."""

    scores: torch.Tensor
    valid: torch.Tensor
    token: RankTarget | None
    block: RankTarget | None
    shares: torch.Tensor | None
    settings: tuple

    def apply(self, change) -> TeacherTargets:
        """The targets with ``change`` applied to every tensor (e.g. sample indexing, ``.to``)."""
        return TeacherTargets(change(self.scores), change(self.valid),
                              None if self.token is None else self.token.apply(change),
                              None if self.block is None else self.block.apply(change),
                              None if self.shares is None else change(self.shares), self.settings)

    def select(self, index: torch.Tensor) -> TeacherTargets:
        return self.apply(lambda tensor: tensor[index.to(tensor.device)])

    @staticmethod
    def concatenate(parts: list[TeacherTargets]) -> TeacherTargets:
        """The samples of ``parts`` (prepared with the same settings), in order."""
        def cat(get):
            values = [get(part) for part in parts]
            return None if values[0] is None else torch.cat(values)

        def cat_rank(get):
            if get(parts[0]) is None:
                return None
            return RankTarget(*(cat(lambda part, name=name: getattr(get(part), name))
                                for name in ("log_p", "spread", "valid")))

        return TeacherTargets(cat(lambda p: p.scores), cat(lambda p: p.valid),
                              cat_rank(lambda p: p.token), cat_rank(lambda p: p.block),
                              cat(lambda p: p.shares), parts[0].settings)

    def to(self, device) -> TeacherTargets:
        return self.apply(lambda tensor: tensor.to(device))


class MultiGranularityLoss(nn.Module):
    """Weighted sum of ``regression_loss``, ``token_rank_loss``, ``block_rank_loss`` and
    ``budget_share_loss``. A weight of 0 drops its term (it is not computed).

    Args:
        regression, token_rank, block_rank, budget_share: weights (>= 0, at least one > 0).
        temperature: of the token and block ranking terms (fraction of a row that matters most).
        block_size: tokens per block of the block term.
        keep_ratios: global budgets of the budget-share term.
        share_temperature: softness of the budget-share term's soft counts (standardised units).

    Call it as ``loss(pred, target)`` with the teacher's scores, or with ``loss.prepare(target)``
    (identical values, without re-sorting the teacher at every step; then ``pred`` must be valid
    wherever the teacher is).
    """

    TERMS = ("regression", "token_rank", "block_rank", "budget_share")

    def __init__(self, regression: float = 0.5, token_rank: float = 1.0, block_rank: float = 0.5,
                 budget_share: float = 0.5, *, temperature: float = 0.1, block_size: int = 32,
                 keep_ratios=(0.1, 0.3, 0.5), share_temperature: float = 0.1):
        super().__init__()
        weights = dict(zip(self.TERMS, (regression, token_rank, block_rank, budget_share)))
        for name, weight in weights.items():
            weights[name] = check_float(f"the weight {name}", weight, minimum=0.0)
        if not any(weights.values()):
            raise ValueError(f"at least one loss weight must be > 0, got {weights}")
        self.weights = weights
        self.temperature = _check_temperature("temperature", temperature)
        self.block_size = check_int("block_size", block_size, minimum=1)
        self.keep_ratios = check_keep_ratios(keep_ratios)
        self.share_temperature = _check_temperature("share_temperature", share_temperature)

    def _settings(self) -> tuple:
        return (tuple(self.weights.items()), self.temperature, self.block_size, self.keep_ratios)

    def prepare(self, target: torch.Tensor) -> TeacherTargets:
        """The teacher-side quantities of ``target`` ``[N, L, H, T]`` for this loss (a score tensor
        as ``pred`` and ``target`` of ``forward``: float32, or float64 read as float32)."""
        target = check_score_tensor("target", target)
        return self._prepare(target, target != NEG_INF)

    def _prepare(self, target: torch.Tensor, valid: torch.Tensor) -> TeacherTargets:
        samples, length = target.shape[0], target.shape[-1]
        rows, valid = target.reshape(samples, -1, length), valid.reshape(samples, -1, length)
        weights = self.weights
        return TeacherTargets(
            scores=target, valid=valid,
            token=RankTarget.from_scores(rows, valid, self.temperature)
            if weights["token_rank"] else None,
            block=_block_target(rows, valid, self.block_size, self.temperature)
            if weights["block_rank"] else None,
            shares=_teacher_shares(rows, valid, self.keep_ratios)
            if weights["budget_share"] else None,
            settings=self._settings())

    def components(self, pred: torch.Tensor,
                   target: torch.Tensor | TeacherTargets) -> dict[str, torch.Tensor]:
        """The unweighted terms with a non-zero weight, by name (differentiable)."""
        if isinstance(target, TeacherTargets):
            pred, _ = check_score_pair(pred, target.scores, "target")
            if target.settings != self._settings():
                raise ValueError("target was prepared by a MultiGranularityLoss with other "
                                 "settings; prepare it with this loss")
            samples, length = pred.shape[0], pred.shape[-1]
            if bool(((pred.reshape(samples, -1, length) == NEG_INF) & target.valid).any()):
                raise ValueError("pred is -inf at a position where the prepared teacher is valid; "
                                 "pass the teacher's scores instead of prepared targets to leave "
                                 "such positions out")
            teacher = target
        else:
            pred, target = check_score_pair(pred, target, "target")
            teacher = self._prepare(target, _valid_both(pred, target))
        rows = pred.reshape(pred.shape[0], -1, pred.shape[-1])
        terms = {
            "regression": lambda: _regression(pred, teacher.scores, teacher.valid),
            "token_rank": lambda: _rank_kl(rows, teacher.token),
            "block_rank": lambda: _rank_kl(_block_max(rows, teacher.valid, self.block_size),
                                           teacher.block),
            "budget_share": lambda: _soft_budget_share(rows, teacher.valid, teacher.shares,
                                                       self.keep_ratios, self.share_temperature),
        }
        return {name: compute() for name, compute in terms.items() if self.weights[name] > 0}

    def combine(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[name] * value for name, value in components.items())

    def forward(self, pred: torch.Tensor, target: torch.Tensor | TeacherTargets) -> torch.Tensor:
        return self.combine(self.components(pred, target))

    def extra_repr(self) -> str:
        weights = ", ".join(f"{k}={v}" for k, v in self.weights.items())
        return (f"{weights}, temperature={self.temperature}, block_size={self.block_size}, "
                f"keep_ratios={self.keep_ratios}, share_temperature={self.share_temperature}")
