"""The zoo's tokenizer: one word per token over the fixed vocabulary of :mod:`proxykv.zoo.tasks`.

A ``tokenizers`` WordLevel model split on whitespace, wrapped as a transformers
``PreTrainedTokenizerFast`` and saved beside each model with :func:`save_tokenizer` so that
``AutoTokenizer.from_pretrained(path)`` loads it as built. ``decode`` joins the words with single
spaces, so ``decode(encode(text)) == text`` for any text of vocabulary words separated by single
spaces.
"""

from __future__ import annotations

from proxykv.zoo.tasks import VOCAB


def build_tokenizer():
    """A fresh ``PreTrainedTokenizerFast`` over :data:`proxykv.zoo.tasks.VOCAB` (ids = indices)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # WordPiece's decoder with an impossible prefix simply joins tokens with spaces
    backend.decoder = decoders.WordPiece(prefix="\x00\x00", cleanup=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>", unk_token="<unk>", eos_token="<sep>",
        additional_special_tokens=["<repeat>", "<query>"],
        model_max_length=1 << 16, clean_up_tokenization_spaces=False,
    )
    return tok


#: module and class that ``tokenizer_config.json``'s ``auto_map`` names (see :func:`save_tokenizer`)
AUTO_MODULE, AUTO_CLASS = "tokenization_proxykv_zoo", "ZooTokenizer"
_AUTO_MODULE_SOURCE = f'''\
"""The class of tokenizer_config.json's auto_map, for AutoTokenizer with trust_remote_code=True.

Written by proxykv.zoo.tokenizer.save_tokenizer. A TokenizersBackend with no __init__ of its own
loads tokenizer.json exactly as saved.
"""

from transformers import TokenizersBackend


class {AUTO_CLASS}(TokenizersBackend):
    """The zoo's word-level tokenizer, as saved in tokenizer.json."""
'''


def save_tokenizer(path) -> None:
    """Save :func:`build_tokenizer` into the folder ``path``, loadable with ``AutoTokenizer``.

    Why more than ``save_pretrained``: transformers 5 (5.24 and 5.25 at least) lists ``qwen2``, the
    zoo's architecture, in ``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``. For such a model type
    ``AutoTokenizer.from_pretrained`` ignores the saved ``tokenizer_class`` (``TokenizersBackend``)
    and loads ``Qwen2Tokenizer``, whose ``__init__`` rebuilds a byte-level BPE from the vocabulary
    of ``tokenizer.json`` and drops its word-level model, pre-tokenizer and decoder: 1024 words of
    a zoo prompt become 380 ids of other words. That override is skipped when
    ``tokenizer_config.json`` has an ``auto_map``; then, without ``trust_remote_code=True``,
    ``AutoTokenizer`` does not use the ``auto_map`` for these model types either and loads the saved
    ``tokenizer_class``, i.e. ``tokenizer.json`` as saved. With ``trust_remote_code=True`` it loads
    the ``auto_map``'s class, so that one is written beside: a ``TokenizersBackend`` without code of
    its own, which loads ``tokenizer.json`` as saved too.
    """
    import json
    from pathlib import Path

    folder = Path(path)
    build_tokenizer().save_pretrained(str(folder))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoTokenizer": [None, f"{AUTO_MODULE}.{AUTO_CLASS}"]}
    # written as save_pretrained writes it
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                           encoding="utf-8")
    (folder / f"{AUTO_MODULE}.py").write_text(_AUTO_MODULE_SOURCE, encoding="utf-8")
