"""Proxy -> target score alignment: adapters (a registry of ``torch.nn.Module``), the
multi-granularity hybrid loss, training, metrics and persistence.

Aligners map proxy log-scores ``[B, Lp, Hp, T]`` to target scores ``[B, Lt, Ht, T]`` (float32,
larger = keep, ``-inf`` = invalid); see ``proxykv.align.base`` for the score-domain conventions.
"""

from proxykv.align.adapters import (
    DepthInterpAligner,
    IdentityAligner,
    LinearAligner,
    MeanBroadcastAligner,
    depth_interp_matrix,
    head_resample_matrix,
    layer_interp_matrix,
)
from proxykv.align.axial import HybridAxialMapper
from proxykv.align.base import Aligner, to_log_scores
from proxykv.align.io import load, read_config, save
from proxykv.align.losses import (
    MultiGranularityLoss,
    TeacherTargets,
    block_rank_loss,
    budget_share_loss,
    regression_loss,
    token_rank_loss,
)
from proxykv.align.metrics import per_head_spearman, topk_recall
from proxykv.align.registry import available_aligners, get_aligner, register_aligner
from proxykv.align.synthetic import synthetic_pair
from proxykv.align.train import FitResult, evaluate_aligner, fit_aligner

__all__ = [
    "Aligner", "DepthInterpAligner", "FitResult", "HybridAxialMapper", "IdentityAligner",
    "LinearAligner", "MeanBroadcastAligner", "MultiGranularityLoss", "TeacherTargets",
    "available_aligners", "block_rank_loss", "budget_share_loss", "depth_interp_matrix",
    "evaluate_aligner", "fit_aligner", "get_aligner", "head_resample_matrix", "layer_interp_matrix",
    "load", "per_head_spearman", "read_config", "register_aligner", "regression_loss", "save",
    "synthetic_pair", "to_log_scores", "token_rank_loss", "topk_recall",
]
