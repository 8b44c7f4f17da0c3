"""The class of tokenizer_config.json's auto_map, for AutoTokenizer with trust_remote_code=True.

Written by proxykv.zoo.tokenizer.save_tokenizer. A TokenizersBackend with no __init__ of its own
loads tokenizer.json exactly as saved.
"""

from transformers import TokenizersBackend


class ZooTokenizer(TokenizersBackend):
    """The zoo's word-level tokenizer, as saved in tokenizer.json."""
