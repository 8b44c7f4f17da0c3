from proxykv.kernels.aggregate.api import (
    GROUP_MODES,
    NORMALIZE_MODES,
    aggregate_scores,
    combine_layers,
    normalize_scores,
    reduce_heads,
)

__all__ = ["GROUP_MODES", "NORMALIZE_MODES", "aggregate_scores", "combine_layers",
           "normalize_scores", "reduce_heads"]
