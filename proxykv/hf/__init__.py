"""The transformers integration of proxykv (needs the ``hf`` extra: ``pip install proxykv[hf]``).

Layers: ``capture`` (post-RoPE queries and keys of each attention layer, handed to a callback as
the layer runs, through transformers' attention-function interface) <- ``scorers`` (per-layer,
per-KV-head importance scores of a prompt's KV pairs: ``window`` = SnapKV, ``reconstruction`` =
KVzip), built by name with ``get_scorer`` <- ``compressed`` (``CompressedCache``, a transformers
``Cache`` of the kept pairs, and the compressed attention that reads it) <- ``pipeline``
(``ProxyKV``: concurrent proxy scoring, alignment, selection, compaction, generation).

``architectures`` says which families and which of their layers are compressed; ``proxies``
builds a proxy from the target's own first layers (``early_layers_proxy``); ``checkpoints`` builds
real pretrained models from registry packages (``get("gemma3-270m")``).

``import proxykv`` never imports this package; importing it without transformers raises an
``ImportError`` that says how to install it.
"""

from __future__ import annotations

try:
    import transformers as _transformers  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "proxykv.hf needs the transformers library, which is not installed; install the extra "
        "with `pip install proxykv[hf]` (or `pip install transformers`)"
    ) from error

from proxykv.hf.capture import (
    SUPPORTED_ATTN_IMPLEMENTATIONS,
    SUPPORTED_MODEL_TYPES,
    AttentionCall,
    AttentionCapture,
    capture_attention,
    check_supported_model,
)
from proxykv.hf.compressed import (
    COMPRESSED_ATTENTION,
    CompressedCache,
    disable_compressed_attention,
    enable_compressed_attention,
    register_compressed_attention,
)
from proxykv.hf.pipeline import STAGES, CompressionStats, ProxyKV, prefill
from proxykv.hf.proxies import early_layers_proxy
from proxykv.hf.scorers import (
    DEFAULT_REPEAT_PROMPT_IDS,
    DEFAULT_REPEAT_PROMPT_TEXT,
    RandomScorer,
    ReconstructionScorer,
    Scorer,
    ScorerOutput,
    WindowScorer,
    available_scorers,
    get_scorer,
    register_scorer,
    unregister_scorer,
)

register_compressed_attention()

__all__ = [
    "COMPRESSED_ATTENTION",
    "DEFAULT_REPEAT_PROMPT_IDS",
    "DEFAULT_REPEAT_PROMPT_TEXT",
    "STAGES",
    "SUPPORTED_ATTN_IMPLEMENTATIONS",
    "SUPPORTED_MODEL_TYPES",
    "AttentionCall",
    "AttentionCapture",
    "CompressedCache",
    "CompressionStats",
    "ProxyKV",
    "RandomScorer",
    "ReconstructionScorer",
    "Scorer",
    "ScorerOutput",
    "WindowScorer",
    "available_scorers",
    "capture_attention",
    "check_supported_model",
    "disable_compressed_attention",
    "early_layers_proxy",
    "enable_compressed_attention",
    "get_scorer",
    "prefill",
    "register_compressed_attention",
    "register_scorer",
    "unregister_scorer",
]
