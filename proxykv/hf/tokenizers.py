"""Loading a checkpoint's tokenizer as it was saved."""

from __future__ import annotations

import json
from pathlib import Path

#: tokenizer classes that mean "the tokenizer.json as saved"
_AS_SAVED = ("TokenizersBackend", "PreTrainedTokenizerFast")
_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path):
    """The tokenizer saved in the folder ``path``, or None if it holds none.

    transformers 5's ``AutoTokenizer`` picks the tokenizer class from the model's type for some
    architectures (Qwen2 among them) and rebuilds it with that class's own pre-tokenizer, which
    breaks a custom ``tokenizer.json`` such as the zoo's word-level one. A folder whose
    ``tokenizer_config.json`` names ``TokenizersBackend``/``PreTrainedTokenizerFast`` is therefore
    loaded with that class, exactly as saved; any other with ``AutoTokenizer``. (A folder without
    tokenizer files gets None: ``AutoTokenizer`` would build an empty tokenizer for it.)

    The zoo's folders no longer need this (``proxykv.zoo.tokenizer.save_tokenizer`` saves them so
    that plain ``AutoTokenizer`` loads them as saved); it stays for other folders, e.g. ones saved
    with plain ``save_pretrained`` or before that change.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = Path(path)
    if not any((folder / name).is_file() for name in _FILES):
        return None
    config_path = folder / "tokenizer_config.json"
    declared = None
    if config_path.is_file():
        try:
            declared = json.loads(config_path.read_text()).get("tokenizer_class")
        except ValueError as error:
            raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    if declared in _AS_SAVED and (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))
