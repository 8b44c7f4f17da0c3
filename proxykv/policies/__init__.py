"""Selection policies: scores ``[B, L, H_kv, T]`` -> ``Selection`` of kept positions.

Registry::

    policy = get_policy("head_budget", scope="global", alpha=0.2)
    selection = policy.select(scores, keep_ratio=0.1)

Policies compose from building blocks (see ``proxykv.policies.base``): protection (``protect`` /
``sink_recent``; ``RecentWindow`` for the policies that take a ``window``), scoring transforms
(``Pooled``, ``Recency``) and allocations (``UniformTopK``, ``HeadBudget``, ``Pyramid``,
``Threshold``), e.g. ``protect(get_policy("head_budget", alpha=0.2), n_sink=4, n_recent=64)``.
"""

from proxykv.policies.base import Policy, Wrapper
from proxykv.policies.budget import keep_ratio_to_budget
from proxykv.policies.head_budget import (
    HEAD_BUDGET_NORMALIZATIONS,
    HEAD_BUDGET_SCOPES,
    HeadBudget,
    normalize_head_scores,
)
from proxykv.policies.pooled import Pooled
from proxykv.policies.protection import Protected, Recency, RecentWindow, protect
from proxykv.policies.pyramid import Pyramid
from proxykv.policies.ranking import top_count_mask
from proxykv.policies.registry import (
    available_policies,
    get_policy,
    register_policy,
    unregister_policy,
)
from proxykv.policies.threshold import Threshold
from proxykv.policies.uniform import UniformTopK

__all__ = [
    "HEAD_BUDGET_NORMALIZATIONS",
    "HEAD_BUDGET_SCOPES",
    "HeadBudget",
    "Policy",
    "Pooled",
    "Protected",
    "Pyramid",
    "Recency",
    "RecentWindow",
    "Threshold",
    "UniformTopK",
    "Wrapper",
    "available_policies",
    "get_policy",
    "keep_ratio_to_budget",
    "normalize_head_scores",
    "protect",
    "register_policy",
    "top_count_mask",
    "unregister_policy",
]
