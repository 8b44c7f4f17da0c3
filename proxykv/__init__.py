"""proxykv: Triton kernels and pluggable policies for cross-model proxy KV-cache pruning."""

from proxykv._backend import BackendChoice, backend_info, interpreter_enabled
from proxykv.kernels import pool_scores

__version__ = "0.1.0"

__all__ = ["BackendChoice", "__version__", "backend_info", "interpreter_enabled", "pool_scores"]
