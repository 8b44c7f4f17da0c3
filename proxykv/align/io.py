"""Save and load aligners: a directory holding ``weights.safetensors`` (the state dict) and
``config.json`` (format version, aligner name, both shapes, constructor parameters, optional
user metadata).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from proxykv.align.base import Aligner, check_model_shape
from proxykv.align.registry import get_aligner

FORMAT = "proxykv-aligner"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"


def save(aligner: Aligner, path, *, metadata: dict | None = None) -> Path:
    """Write ``aligner`` into the directory ``path`` (created if needed; existing files of the same
    names are replaced). ``metadata`` is any JSON-serialisable dict kept with the config (e.g. the
    model names and the fit's metrics). Returns the directory."""
    if not isinstance(aligner, Aligner):
        raise TypeError(f"aligner must be a proxykv.align.Aligner, got {type(aligner).__name__}")
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, **aligner.config(),
              "metadata": metadata or {}}
    try:
        text = json.dumps(config, indent=2, sort_keys=True)
    except TypeError as error:
        raise TypeError(f"the aligner's params and metadata must be JSON-serialisable: {error}") \
            from error
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.detach().cpu().contiguous()
               for name, tensor in aligner.state_dict().items()}
    save_file(weights, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
    (directory / CONFIG_FILE).write_text(text + "\n")
    return directory


def read_config(path) -> dict:
    """The ``config.json`` of a saved aligner, checked for format and shapes."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"no aligner config at {config_path} (expected a directory written "
                                f"by proxykv.align.save)")
    config = json.loads(config_path.read_text())
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path} is not a {FORMAT} config of version {FORMAT_VERSION}, got "
                         f"format={config.get('format')!r} "
                         f"format_version={config.get('format_version')!r}")
    for key in ("aligner", "proxy_shape", "target_shape", "params"):
        if key not in config:
            raise ValueError(f"{config_path} lacks the field {key!r}")
    return config


def load(path, *, proxy_shape=None, target_shape=None,
         map_location: torch.device | str = "cpu") -> Aligner:
    """Rebuild the aligner saved in the directory ``path`` on ``map_location``.

    ``proxy_shape`` / ``target_shape`` (``(layers, heads)``), when given, must equal the saved
    shapes: loading an aligner for other models raises ``ValueError``. So do weights that do not
    match the saved configuration.
    """
    config = read_config(path)
    saved = {"proxy_shape": tuple(config["proxy_shape"]),
             "target_shape": tuple(config["target_shape"])}
    for name, expected in (("proxy_shape", proxy_shape), ("target_shape", target_shape)):
        if expected is not None and check_model_shape(name, expected) != saved[name]:
            raise ValueError(f"the aligner saved at {path} maps {saved['proxy_shape']} -> "
                             f"{saved['target_shape']} (layers, heads), but {name}="
                             f"{tuple(expected)} was requested")
    aligner = get_aligner(config["aligner"], saved["proxy_shape"], saved["target_shape"],
                          **config["params"])
    weights_path = Path(path) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"no aligner weights at {weights_path}")
    weights = load_file(str(weights_path), device="cpu")
    try:
        aligner.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise ValueError(f"the weights at {weights_path} do not fit the saved "
                         f"{config['aligner']!r} configuration: {error}") from error
    return aligner.to(map_location)
