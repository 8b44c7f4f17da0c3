"""proxykv: Triton kernels and pluggable policies for cross-model proxy KV-cache pruning.

Layers (dependencies point down): ``proxykv.kernels`` (ops with Triton, torch and reference
implementations) <- ``proxykv.policies`` (scores -> ``Selection``) <- ``proxykv.align``
(proxy -> target score adapters). ``proxykv.cache.RaggedKVCache`` holds a per-head compacted cache.
"""

from proxykv import align, policies
from proxykv._backend import BackendChoice, backend_info, interpreter_enabled
from proxykv.cache import RaggedKVCache
from proxykv.kernels import (
    aggregate_scores,
    attention_scores,
    combine_layers,
    gather_kv,
    gather_kv_ragged,
    normalize_scores,
    pool_scores,
    ragged_attention,
    ragged_decode_attention,
    reduce_heads,
)
from proxykv.policies import available_policies, get_policy
from proxykv.selection import LayerSelection, Selection

__version__ = "0.1.0"

__all__ = [
    "BackendChoice", "LayerSelection", "RaggedKVCache", "Selection", "__version__",
    "aggregate_scores", "align", "attention_scores", "available_policies", "backend_info",
    "combine_layers", "gather_kv", "gather_kv_ragged", "get_policy", "interpreter_enabled",
    "normalize_scores", "policies", "pool_scores", "ragged_attention", "ragged_decode_attention",
    "reduce_heads",
]

#: names served from the transformers integration on first use, so that ``import proxykv`` stays
#: free of transformers (``proxykv.ProxyKV`` is ``proxykv.hf.ProxyKV``)
_FROM_HF = ("ProxyKV", "CompressedCache")


def __getattr__(name: str):
    if name in _FROM_HF:
        from proxykv import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'proxykv' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_FROM_HF])
