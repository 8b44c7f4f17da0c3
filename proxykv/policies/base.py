"""``Policy``: the interface every selection strategy implements, and the building blocks'
common plumbing (input checks, budget resolution, turning a keep-mask into a ``Selection``).

A policy is a composition of three independent choices, so no class is needed per combination:

* **protection** (``Protected``: sinks / recent window) — positions always kept, outside the
  choice; the wrapped policy spends the rest of the same budget;
* **scoring transform** (``Pooled``, ``Recency``, or none) — rewrites the scores it passes on;
* **allocation** (``UniformTopK``, ``HeadBudget``, ``Pyramid``, ``Threshold``) — decides how many
  positions each head keeps and which.

Internally every policy answers ``keep_mask(scores, row_budget)``: ``scores`` float32
``[B, L, H_kv, T]`` where ``-inf`` marks a position it may not choose (invalid, or protected by an
outer wrapper), ``row_budget`` int64 ``[B, L, H_kv]`` (None for adaptive policies) — what each head
would keep under a uniform allocation. It returns a bool mask that never contains a ``-inf``
position. ``select`` validates, calls it once and builds the ``Selection``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from proxykv._validation import check_tensor
from proxykv.policies.budget import resolve_budget
from proxykv.selection import Selection


class Policy(ABC):
    """Turns scores into a ``Selection``. Subclasses implement ``keep_mask``.

    Class attributes a subclass may override:
        needs_budget: False for adaptive policies whose budget follows the scores (threshold).
        uniform_allocation: True when every head gets the same count, so ``select`` returns a
            uniform ``Selection`` whenever every head can fill it (otherwise ragged).
    """

    needs_budget: bool = True
    uniform_allocation: bool = True

    def select(self, scores: torch.Tensor, *, keep_ratio: float | None = None,
               budget: int | None = None) -> Selection:
        """Choose the kept positions of every (batch, layer, KV head).

        Args:
            scores: float32 ``[B, L, H_kv, T]``, any strides, every dimension >= 1; larger = more
                important; ``-inf`` marks an invalid position (e.g. padding). ``+inf`` is allowed
                and ranks first. Not modified.
            keep_ratio: fraction in ``(0, 1]`` of the ``T`` positions each head keeps on average;
                maps to ``budget = max(1, floor(keep_ratio * T + 0.5))``.
            budget: the same as a count: positions kept per head on average, int in ``[1, T]``.
                Exactly one of ``keep_ratio``/``budget`` — neither for adaptive policies.

        Returns:
            A ``Selection`` recording the per-head budget asked for (adaptive policies: the mean
            count kept). Policies that give every head the same count return the uniform form
            ``[B, L, H_kv, k]`` when every head keeps the same number (the budget, unless invalid
            positions cut it short in every head alike); everything else is ragged.

        Invalid positions: a ``-inf`` position is **never** kept, protected or not. A head with
        fewer valid positions than its budget keeps all of them (and the result is ragged); its
        shortfall is not handed to other heads except by policies that pool budgets
        (``head_budget``, ``pyramid``), which move it to heads that have valid positions left.

        Raises:
            TypeError / ValueError: wrong rank or dtype of ``scores``, an empty dimension, NaN
            scores, a bad ``keep_ratio``/``budget`` (see ``resolve_budget``), a budget smaller than
            the positions the policy always keeps, or a protected set larger than ``T``.
        """
        check_scores(scores)
        batch, layers, heads, seq_len = scores.shape
        per_head = resolve_budget(seq_len, keep_ratio, budget, needs_budget=self.needs_budget,
                                  policy_name=repr(self))
        self.check_seq_len(seq_len)
        row_budget = None
        if per_head is not None:
            required = self.required_budget(seq_len)
            if per_head < required:
                source = f" (from keep_ratio={keep_ratio!r})" if keep_ratio is not None else ""
                raise ValueError(f"budget={per_head}{source} is smaller than the {required} "
                                 f"positions per head that {self!r} always keeps")
            row_budget = torch.full((batch, layers, heads), per_head, dtype=torch.int64,
                                    device=scores.device)
        mask = self.keep_mask(scores, row_budget)
        return Selection.from_mask(mask, per_head, allow_uniform=self.uniform_allocation)

    @abstractmethod
    def keep_mask(self, scores: torch.Tensor, row_budget: torch.Tensor | None) -> torch.Tensor:
        """bool ``[B, L, H_kv, T]`` of kept positions (see the module docstring)."""

    def required_budget(self, seq_len: int) -> int:
        """Positions per head this policy keeps whatever the scores (its protected set)."""
        return 0

    def check_seq_len(self, seq_len: int) -> None:
        """Raise ``ValueError`` if the policy's parameters cannot apply to ``T = seq_len``."""

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in self._params().items())
        return f"{type(self).__name__}({params})"

    def _params(self) -> dict:
        return {}


class Wrapper(Policy):
    """A policy that transforms what it passes to an ``inner`` policy (protection, rescoring,
    reallocation); by default it inherits the inner policy's budget needs and output form."""

    def __init__(self, inner: Policy, *, inner_needs_budget: bool = False):
        self.inner = check_policy("inner", inner, needs_budget=inner_needs_budget,
                                  wrapper=type(self).__name__)

    @property
    def needs_budget(self) -> bool:  # type: ignore[override]
        return self.inner.needs_budget

    @property
    def uniform_allocation(self) -> bool:  # type: ignore[override]
        return self.inner.uniform_allocation

    def required_budget(self, seq_len: int) -> int:
        return self.inner.required_budget(seq_len)

    def check_seq_len(self, seq_len: int) -> None:
        self.inner.check_seq_len(seq_len)


def check_policy(name: str, value, *, needs_budget: bool = False, wrapper: str = "") -> Policy:
    """``value`` is a ``Policy`` (and one that spends a budget when ``needs_budget``)."""
    if not isinstance(value, Policy):
        raise TypeError(f"{name} must be a Policy (e.g. get_policy('topk')), got "
                        f"{type(value).__name__} {value!r}")
    if needs_budget and not value.needs_budget:
        raise ValueError(f"{name} of {wrapper} must spend a budget, got {value!r}, which chooses "
                         "its own")
    return value


def check_scores(scores) -> torch.Tensor:
    """float32 ``[B, L, H_kv, T]``, no empty dimension, no NaN (one device sync)."""
    check_tensor("scores", scores, ndim=4, layout="[B, L, H_kv, T]", dtypes=(torch.float32,))
    if min(scores.shape) < 1:
        raise ValueError(f"scores must have B, L, H_kv, T >= 1, got shape {tuple(scores.shape)}")
    if bool(torch.isnan(scores).any()):
        raise ValueError(f"scores must not contain NaN (use -inf for invalid positions); "
                         f"{int(torch.isnan(scores).sum())} NaN found")
    return scores
