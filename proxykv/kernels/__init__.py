"""proxykv kernel ops. Each op lives in its own folder with ``api.py`` (validation + dispatch),
``reference.py`` (naive oracle), ``torch_impl.py`` (CPU) and ``triton_impl.py`` (kernels)."""

from proxykv.kernels.pool import POOL_MODES, pool_scores

__all__ = ["POOL_MODES", "pool_scores"]
