from proxykv.kernels.attention.api import QUERY_REDUCTIONS, attention_scores

__all__ = ["QUERY_REDUCTIONS", "attention_scores"]
