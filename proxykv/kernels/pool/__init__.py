from proxykv.kernels.pool.api import POOL_MODES, pool_scores

__all__ = ["POOL_MODES", "pool_scores"]
