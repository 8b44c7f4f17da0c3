"""proxykv kernel ops. Each op lives in its own folder with ``api.py`` (validation + dispatch),
``reference.py`` (naive oracle), ``torch_impl.py`` (CPU) and ``triton_impl.py`` (kernels)."""

from proxykv.kernels.aggregate import (
    GROUP_MODES,
    NORMALIZE_MODES,
    aggregate_scores,
    combine_layers,
    normalize_scores,
    reduce_heads,
)
from proxykv.kernels.attend import ragged_attention, ragged_decode_attention
from proxykv.kernels.attention import QUERY_REDUCTIONS, attention_scores
from proxykv.kernels.gather import gather_kv, gather_kv_ragged
from proxykv.kernels.pool import POOL_MODES, pool_scores

__all__ = [
    "GROUP_MODES", "NORMALIZE_MODES", "POOL_MODES", "QUERY_REDUCTIONS",
    "aggregate_scores", "attention_scores", "combine_layers", "gather_kv", "gather_kv_ragged",
    "normalize_scores", "pool_scores", "ragged_attention", "ragged_decode_attention",
    "reduce_heads",
]
