"""Naive, readable oracles of the policies, for tests and benchmark checks.

Each returns a bool keep-mask ``[B, L, H_kv, T]`` built with Python loops over heads and explicit
sorting by the documented order — score descending, then lower index — never by the vectorised
cut-value arithmetic of the real implementation. Only for small inputs.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from proxykv.kernels.pool.reference import pool_scores_reference

NEG_INF = float("-inf")


def preference_order(values: list[float]) -> list[int]:
    """Indices of the finite-or-+inf entries, best first (higher value, then lower index)."""
    ranked = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return [i for i in ranked if values[i] != NEG_INF]


def topk_reference(scores: torch.Tensor, budgets) -> torch.Tensor:
    """Each head keeps its ``budgets[b][l][h]`` (or one int for all) best positions."""
    batch, layers, heads, _ = scores.shape
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    for b in range(batch):
        for layer in range(layers):
            for h in range(heads):
                count = budgets if isinstance(budgets, int) else int(budgets[b][layer][h])
                for position in preference_order(scores[b, layer, h].tolist())[:count]:
                    mask[b, layer, h, position] = True
    return mask


def normalized_rows_reference(scores: torch.Tensor, normalize: str) -> torch.Tensor:
    """Each ``(b, l, h)`` row of ``scores`` on its own, in Python floats: ``"softmax"`` subtracts
    the log of the sum of ``exp`` of the row's finite entries, ``"sum"`` divides them by their sum
    (unchanged when it is 0), ``"none"`` keeps them; +-inf entries stay. Rounded to float32."""
    out = scores.double().clone()
    for index in _row_indices(scores):
        row = scores[index].tolist()
        finite = [value for value in row if math.isfinite(value)]
        if normalize == "softmax" and finite:
            top = max(finite)
            offset = top + math.log(math.fsum(math.exp(value - top) for value in finite))
            row = [value - offset if math.isfinite(value) else value for value in row]
        elif normalize == "sum" and math.fsum(finite) > 0:
            total = math.fsum(finite)
            row = [value / total if math.isfinite(value) else value for value in row]
        out[index] = torch.tensor(row, dtype=torch.float64)
    return out.float()


def _row_indices(scores: torch.Tensor):
    batch, layers, heads, _ = scores.shape
    return [(b, layer, h) for b in range(batch) for layer in range(layers) for h in range(heads)]


def head_budget_reference(scores: torch.Tensor, budgets, scope: str,
                          alpha: float, normalize: str = "softmax") -> torch.Tensor:
    """AdaKV: each head keeps its best ``floor(alpha * budget + 0.5)`` positions, then the scope
    (a layer, or the whole model) keeps its best remaining entries — ordered by the heads'
    ``normalize``d scores (``normalized_rows_reference``), then (layer, head, position) — until it
    holds the sum of its heads' budgets. ``budgets``: one int for every head, or nested lists
    ``[B][L][H]``."""
    batch, layers, heads, seq_len = scores.shape
    if isinstance(budgets, int):
        budgets = [[[budgets] * heads for _ in range(layers)] for _ in range(batch)]
    floors = [[[int(alpha * budgets[b][layer][h] + 0.5) for h in range(heads)]
               for layer in range(layers)] for b in range(batch)]
    mask = topk_reference(scores, floors)
    compared = normalized_rows_reference(scores, normalize)
    groups = [[(layer,) for layer in range(layers)]] if scope == "global" else \
        [[(layer,)] for layer in range(layers)]
    for b in range(batch):
        for group_layers in groups:
            entries = []  # (compared score, layer, head, position) of what the floor did not take
            valid = 0
            for (layer,) in group_layers:
                for h in range(heads):
                    row = compared[b, layer, h].tolist()
                    valid += sum(value != NEG_INF for value in row)
                    entries += [(row[t], layer, h, t) for t in range(seq_len)
                                if row[t] != NEG_INF and not mask[b, layer, h, t]]
            taken = int(mask[b, [g[0] for g in group_layers]].sum())
            pooled = sum(budgets[b][layer][h] for (layer,) in group_layers for h in range(heads))
            rest = min(pooled, valid) - taken
            entries.sort(key=lambda e: (-e[0], e[1], e[2], e[3]))
            for _, layer, h, t in entries[:rest]:
                mask[b, layer, h, t] = True
    return mask


def protected_positions_reference(seq_len: int, n_sink: int, n_recent: int) -> list[int]:
    return [t for t in range(seq_len) if t < n_sink or t >= seq_len - n_recent]


def without(scores: torch.Tensor, positions: list[int]) -> torch.Tensor:
    hidden = scores.clone()
    hidden[..., positions] = NEG_INF
    return hidden


def protected_count(scores: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """int64 ``[B, L, H]``: valid protected positions per head."""
    return (scores[..., positions] > NEG_INF).sum(-1) if positions else \
        torch.zeros(scores.shape[:3], dtype=torch.int64)


def protected_mask(scores: torch.Tensor, positions: list[int]) -> torch.Tensor:
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    mask[..., positions] = True
    return mask & (scores > NEG_INF)


def sink_recent_reference(scores: torch.Tensor, budget: int, n_sink: int) -> torch.Tensor:
    """StreamingLLM: the first ``n_sink`` valid-or-not positions (invalid ones dropped), then the
    latest valid positions until the head holds ``budget``."""
    sinks = protected_positions_reference(scores.shape[-1], n_sink, 0)
    mask = protected_mask(scores, sinks)
    batch, layers, heads, seq_len = scores.shape
    for b in range(batch):
        for layer in range(layers):
            for h in range(heads):
                room = budget - int(mask[b, layer, h].sum())
                for t in reversed(range(n_sink, seq_len)):
                    if room == 0:
                        break
                    if scores[b, layer, h, t] != NEG_INF:
                        mask[b, layer, h, t] = True
                        room -= 1
    return mask


def pooled_window_reference(scores: torch.Tensor, budget: int, window: int, kernel_size: int,
                            mode: str, pool=pool_scores_reference) -> torch.Tensor:
    """SnapKV: keep the last ``window`` valid positions, pool the other scores (the window seen
    as invalid) with ``pool(scores, kernel_size, mode)`` and keep the best of the rest of the
    budget."""
    recent = protected_positions_reference(scores.shape[-1], 0, window)
    pooled = pool(without(scores, recent), kernel_size, mode)
    room = budget - protected_count(scores, recent)
    return protected_mask(scores, recent) | topk_reference(pooled, room.tolist())


def threshold_reference(scores: torch.Tensor, tau: float, min_per_head: int = 0,
                        window: int = 0) -> torch.Tensor:
    recent = protected_positions_reference(scores.shape[-1], 0, window)
    choosable = without(scores, recent)
    mask = (choosable > tau) | topk_reference(choosable, min_per_head)
    return mask | protected_mask(scores, recent)


def pyramid_budgets_reference(budget: int, capacity: list[int], beta: float) -> list[int]:
    """PyramidKV layer budgets of one (batch, head) column, in exact rational arithmetic:
    linear weights from ``2 - 1/beta`` to ``1/beta``, a layer over its capacity passes the excess
    to the uncapped ones in proportion to their weights (repeated until none is over), then
    largest-remainder rounding (ties to the lower layer)."""
    layers = len(capacity)
    beta = Fraction(beta)
    if layers == 1:
        weights = [Fraction(1)]
    else:
        first, last = 2 - 1 / beta, 1 / beta
        weights = [first + (last - first) * Fraction(layer, layers - 1) for layer in range(layers)]
    total = min(budget * layers, sum(capacity))
    shares = [Fraction(0)] * layers
    open_layers = set(range(layers))
    left = Fraction(total)
    while left > 0 and open_layers:
        weight_sum = sum(weights[layer] for layer in open_layers)
        for layer in sorted(open_layers):
            shares[layer] += left * weights[layer] / weight_sum
        left = Fraction(0)
        for layer in sorted(open_layers):
            if shares[layer] >= capacity[layer]:
                left += shares[layer] - capacity[layer]
                shares[layer] = Fraction(capacity[layer])
                open_layers.discard(layer)
    whole = [int(share) for share in shares]
    missing = total - sum(whole)
    by_remainder = sorted(range(layers), key=lambda layer: (-(shares[layer] - whole[layer]), layer))
    for layer in by_remainder[:missing]:
        whole[layer] += 1
    return whole


def pyramid_reference(scores: torch.Tensor, budget: int, beta: float) -> tuple[torch.Tensor, list]:
    """PyramidKV with top-k inside each layer; returns the mask and the budgets ``[B][L][H]``."""
    batch, layers, heads, _ = scores.shape
    capacity = (scores > NEG_INF).sum(-1)
    budgets = [[[0] * heads for _ in range(layers)] for _ in range(batch)]
    for b in range(batch):
        for h in range(heads):
            column = pyramid_budgets_reference(budget, capacity[b, :, h].tolist(), beta)
            for layer in range(layers):
                budgets[b][layer][h] = column[layer]
    return topk_reference(scores, budgets), budgets
