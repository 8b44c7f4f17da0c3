"""``Policy``: the interface every selection strategy implements, and the building blocks'
common plumbing (input checks, budget resolution, turning a keep-mask into a ``Selection``).

A policy is a composition of three independent choices, so no class is needed per combination:

* **protection** (``Protected``: sinks / recent window) — positions always kept, outside the
  choice; the wrapped policy spends the rest of the same budget;
* **scoring transform** (``Pooled``, ``Recency``, or none) — rewrites the scores it passes on;
* **allocation** (``UniformTopK``, ``HeadBudget``, ``Pyramid``, ``Threshold``) — decides how many
  positions each head keeps and which.

Every policy answers ``keep_mask(scores, row_budget)``: ``scores`` float32 ``[B, L, H_kv, T]``
where ``-inf`` marks a position it may not choose (invalid, or protected by an outer wrapper),
``row_budget`` int64 ``[B, L, H_kv]`` (None for adaptive policies) — what each head would keep
under a uniform allocation. It returns a bool mask that never contains a ``-inf`` position.
``select`` validates, calls it once and builds the ``Selection``.

``keep_mask`` is a public entry point too: called from outside a policy, it checks its arguments
first (``Policy.__init_subclass__`` wraps every implementation, so custom policies get the checks
as well). A policy calling ``keep_mask`` of its inner policy passes arguments that are already
checked or that it built itself, so nested calls skip the checks (``_inputs_checked``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from abc import ABC, abstractmethod

import torch

from proxykv._validation import (
    INDEX_DTYPES,
    as_score_tensor,
    check_no_nan,
    check_same_device,
    check_tensor,
)
from proxykv.policies.budget import resolve_budget
from proxykv.selection import Selection

# True while a policy runs on arguments that select or an outer keep_mask has checked.
_CHECKED = contextvars.ContextVar("proxykv_policy_inputs_checked", default=False)


@contextlib.contextmanager
def _inputs_checked():
    token = _CHECKED.set(True)
    try:
        yield
    finally:
        _CHECKED.reset(token)


class Policy(ABC):
    """Turns scores into a ``Selection``. Subclasses implement ``keep_mask``.

    Class attributes a subclass may override:
        needs_budget: False for adaptive policies whose budget follows the scores (threshold).
        uniform_allocation: True when every head gets the same count, so ``select`` returns a
            uniform ``Selection`` whenever every head can fill it (otherwise ragged).
    """

    needs_budget: bool = True
    uniform_allocation: bool = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        implementation = cls.__dict__.get("keep_mask")
        if implementation is not None and not getattr(implementation, "__isabstractmethod__",
                                                      False):
            cls.keep_mask = _checking_arguments(implementation)

    def select(self, scores: torch.Tensor, *, keep_ratio: float | None = None,
               budget: int | None = None) -> Selection:
        """Choose the kept positions of every (batch, layer, KV head).

        Args:
            scores: float32 (or float64, read as float32) ``[B, L, H_kv, T]``, any strides, every
                dimension >= 1, on a CPU or CUDA device; larger = more important; ``-inf`` marks
                an invalid position (e.g. padding); no NaN. ``+inf`` is a valid score that ranks
                first (ties among ``+inf`` to the lower position). Not modified.
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
            TypeError / ValueError: ``scores`` not as above (``check_scores``; a NaN is reported
            at its first position), a bad ``keep_ratio``/``budget`` (see ``resolve_budget``), a
            budget smaller than the positions the policy always keeps, or a protected set larger
            than ``T``.
        """
        scores = check_scores(scores)
        batch, layers, heads, seq_len = scores.shape
        per_head = self.check_applicable(seq_len, keep_ratio=keep_ratio, budget=budget)
        row_budget = None
        if per_head is not None:
            row_budget = torch.full((batch, layers, heads), per_head, dtype=torch.int64,
                                    device=scores.device)
        with _inputs_checked():
            mask = self.keep_mask(scores, row_budget)
        return Selection.from_mask(mask, per_head, allow_uniform=self.uniform_allocation)

    @abstractmethod
    def keep_mask(self, scores: torch.Tensor, row_budget: torch.Tensor | None) -> torch.Tensor:
        """bool ``[B, L, H_kv, T]`` of kept positions (see the module docstring).

        Called directly, it checks its arguments first: ``scores`` as for ``select``;
        ``row_budget`` an int32/int64 ``[B, L, H_kv]`` tensor on the device of ``scores`` with
        values in ``[0, T]`` (read as int64) for a policy that spends a budget, None for an
        adaptive one. That costs up to two device syncs; ``select`` checks once.
        """

    def check_applicable(self, seq_len: int, *, keep_ratio: float | None = None,
                         budget: int | None = None) -> int | None:
        """The per-head budget ``select`` would spend on ``T = seq_len`` positions (None for an
        adaptive policy), without any scores: what a caller checks before computing them.

        Raises ``ValueError``/``TypeError`` as ``select`` does for the budget and the policy's
        parameters (a budget past ``T``, below the protected positions, a window past ``T``)."""
        per_head = resolve_budget(seq_len, keep_ratio, budget, needs_budget=self.needs_budget,
                                  policy_name=repr(self))
        self.check_seq_len(seq_len)
        if per_head is not None:
            required = self.required_budget(seq_len)
            if per_head < required:
                source = f" (from keep_ratio={keep_ratio!r})" if keep_ratio is not None else ""
                raise ValueError(f"budget={per_head}{source} is smaller than the {required} "
                                 f"positions per head that {self!r} always keeps")
        return per_head

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
    """The float32 scores of a policy call: float32 or float64 ``[B, L, H_kv, T]`` on a CPU or
    CUDA device, no empty dimension, no NaN (one device sync; ``+inf`` is allowed)."""
    scores = as_score_tensor("scores", scores, ndim=4, layout="[B, L, H_kv, T]")
    check_no_nan("scores", scores, why="use -inf for invalid positions")
    return scores


def check_row_budget(row_budget, scores: torch.Tensor, policy: Policy) -> torch.Tensor | None:
    """The int64 ``row_budget`` of a direct ``keep_mask`` call on checked ``scores``: None for an
    adaptive ``policy``, else ``[B, L, H_kv]`` with values in ``[0, T]`` (one device sync)."""
    if not policy.needs_budget:
        if row_budget is not None:
            raise ValueError(f"row_budget must be None for {policy!r}, which chooses its own "
                             f"budget, got {type(row_budget).__name__}")
        return None
    check_tensor("row_budget", row_budget, dtypes=INDEX_DTYPES)
    check_same_device(scores=scores, row_budget=row_budget)
    if row_budget.shape != scores.shape[:3]:
        raise ValueError(f"row_budget must have shape [B, L, H_kv] = {tuple(scores.shape[:3])}, "
                         f"got {tuple(row_budget.shape)}")
    low, high = torch.stack([row_budget.min(), row_budget.max()]).tolist()
    seq_len = scores.shape[-1]
    if low < 0 or high > seq_len:
        raise ValueError(f"row_budget must lie in [0, {seq_len}] (positions kept per head), got "
                         f"values in [{low}, {high}]")
    return row_budget.long()


def _checking_arguments(keep_mask):
    """``keep_mask`` that checks its arguments, unless a policy calls it on checked ones."""
    @functools.wraps(keep_mask)
    def checked_keep_mask(self, scores, row_budget):
        if _CHECKED.get():
            return keep_mask(self, scores, row_budget)
        scores = check_scores(scores)
        row_budget = check_row_budget(row_budget, scores, self)
        with _inputs_checked():
            return keep_mask(self, scores, row_budget)

    return checked_keep_mask
