"""Protection (sinks and a recent window) and StreamingLLM's ``sink_recent``.

``protect(policy, n_sink=..., n_recent=...)`` wraps any policy: the first ``n_sink`` and last
``n_recent`` positions are always kept and the wrapped policy chooses the rest of the **same**
budget among the other positions (it sees them as ``-inf``). ``sink_recent`` is the same wrapper,
registered: with no ``inner`` policy it fills the rest of the budget with the most recent
positions, which is StreamingLLM. ``RecentWindow`` is the protection of the policies that take a
``window`` (``pooled_window``, ``threshold``), so their messages and repr name ``window``.
"""

from __future__ import annotations

import torch

from proxykv._validation import check_int
from proxykv.policies.base import Policy, Wrapper
from proxykv.policies.registry import register_policy
from proxykv.policies.uniform import UniformTopK


class Protected(Wrapper):
    """Keeps positions ``[0, n_sink)`` and ``[T - n_recent, T)`` of every head, then lets ``inner``
    choose among the others with each head's budget reduced by what protection kept.

    Protected positions that are ``-inf`` (invalid) are not kept; their share of the budget goes
    back to ``inner``. The budget must be at least ``n_sink + n_recent``.
    """

    def __init__(self, inner: Policy, n_sink: int = 0, n_recent: int = 0):
        super().__init__(inner)
        self.n_sink = check_int("n_sink", n_sink, minimum=0)
        self.n_recent = check_int("n_recent", n_recent, minimum=0)

    def _params(self) -> dict:
        return {"n_sink": self.n_sink, "n_recent": self.n_recent, "inner": self.inner}

    def required_budget(self, seq_len: int) -> int:
        return self.n_sink + self.n_recent + self.inner.required_budget(seq_len)

    def check_seq_len(self, seq_len: int) -> None:
        if self.n_sink + self.n_recent > seq_len:
            # Named as the caller named them (_params), e.g. "window=40" for RecentWindow.
            sizes = " + ".join(f"{key}={value}" for key, value in self._params().items()
                               if key != "inner")
            raise ValueError(f"{sizes} protected positions exceed the T={seq_len} positions of "
                             "the scores")
        self.inner.check_seq_len(seq_len)

    def protected_positions(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """bool ``[T]``: True at the sink and recent positions."""
        positions = torch.arange(seq_len, device=device)
        return (positions < self.n_sink) | (positions >= seq_len - self.n_recent)

    def keep_mask(self, scores: torch.Tensor, row_budget: torch.Tensor | None) -> torch.Tensor:
        pattern = self.protected_positions(scores.shape[-1], scores.device)
        protected = pattern & (scores > float("-inf"))
        inner_budget = None if row_budget is None else row_budget - protected.sum(-1)
        inner_mask = self.inner.keep_mask(scores.masked_fill(pattern, float("-inf")), inner_budget)
        return inner_mask | protected


class RecentWindow(Protected):
    """``Protected`` with only a recent window, of ``window`` positions: the last ``window``
    positions of every head are always kept and ``inner`` chooses the rest of the budget."""

    def __init__(self, inner: Policy, window: int):
        super().__init__(inner, n_recent=check_int("window", window, minimum=0))

    def _params(self) -> dict:
        return {"window": self.n_recent, "inner": self.inner}


class Recency(Wrapper):
    """Replaces every valid score by its position, so ``inner`` prefers the most recent positions
    (invalid ones stay ``-inf``): StreamingLLM's score-free choice."""

    def _params(self) -> dict:
        return {"inner": self.inner}

    def keep_mask(self, scores: torch.Tensor, row_budget: torch.Tensor | None) -> torch.Tensor:
        # float32 holds every position exactly up to 2**24 tokens.
        positions = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.float32)
        recency = torch.where(scores > float("-inf"), positions, float("-inf"))
        return self.inner.keep_mask(recency, row_budget)


def protect(policy: Policy, *, n_sink: int = 0, n_recent: int = 0) -> Policy:
    """``policy`` with the first ``n_sink`` and last ``n_recent`` positions always kept; it chooses
    the rest of the same budget. Equivalent to ``get_policy("sink_recent", ..., inner=policy)``."""
    return Protected(policy, n_sink=n_sink, n_recent=n_recent)


@register_policy("sink_recent")
def sink_recent(n_sink: int = 4, n_recent: int = 0, inner: Policy | None = None) -> Policy:
    """``sink_recent`` (StreamingLLM, Xiao et al. 2024, "Efficient Streaming Language Models with
    Attention Sinks"; 4 sink tokens by default).

    Alone (``inner=None``): keeps the first ``n_sink`` positions and fills the rest of the budget
    with the most recent ones, scores ignored (``n_recent`` then changes nothing). As protection
    around ``inner``: the first ``n_sink`` and last ``n_recent`` positions are always kept and
    ``inner`` chooses the rest of the same budget. Uniform result unless positions are invalid
    (or ``inner`` is ragged).
    """
    if inner is None:
        inner = Recency(UniformTopK())
    return Protected(inner, n_sink=n_sink, n_recent=n_recent)
