"""proxykv's own small model family: tasks, tokenizer, training and the committed weights.

- :mod:`proxykv.zoo.tasks` — seeded task generators over a fixed 256-word vocabulary
  (multi-key retrieval, multi-query retrieval, variable tracking; the copy task for training).
- :mod:`proxykv.zoo.tokenizer` — a transformers-compatible word-level tokenizer.
- :mod:`proxykv.zoo.train` — ``python -m proxykv.zoo.train --out DIR --model target|proxy``.
- :mod:`proxykv.zoo.accuracy` — full-cache greedy accuracy per task.
- ``weights/target`` and ``weights/proxy`` — the trained pair (config, safetensors, tokenizer,
  ``train_info.json``), loadable with ``from_pretrained`` (see :func:`weights_path`).

Only this package's training and loading functions import transformers (lazily).
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MODELS = ("target", "proxy")


def weights_path(name: str) -> Path:
    """Folder of the committed zoo model ``name`` ("target" or "proxy")."""
    if name not in MODELS:
        raise ValueError(f"name must be one of {MODELS}, got {name!r}")
    return WEIGHTS_DIR / name


def load_model(name: str, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` of the committed zoo model ``name``."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(weights_path(name)), **kwargs)


def load_tokenizer(name: str = "target"):
    """The tokenizer saved beside zoo model ``name`` (``proxykv.hf.tokenizers.load_tokenizer``;
    ``AutoTokenizer.from_pretrained(weights_path(name))`` gives the same tokenizer, see
    ``proxykv.zoo.tokenizer.save_tokenizer``)."""
    from proxykv.hf.tokenizers import load_tokenizer

    return load_tokenizer(weights_path(name))


__all__ = ["MODELS", "WEIGHTS_DIR", "load_model", "load_tokenizer", "weights_path"]
