"""The zoo's tokenizer: one word per token over the fixed vocabulary of :mod:`proxykv.zoo.tasks`.

A ``tokenizers`` WordLevel model split on whitespace, wrapped as a transformers
``PreTrainedTokenizerFast`` and saved beside each model with ``save_pretrained`` so that
``AutoTokenizer.from_pretrained(path)`` loads it. ``decode`` joins the words with single spaces,
so ``decode(encode(text)) == text`` for any text of vocabulary words separated by single spaces.
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


def save_tokenizer(path) -> None:
    build_tokenizer().save_pretrained(str(path))
