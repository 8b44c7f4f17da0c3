"""Save and load aligners: a directory holding ``weights.safetensors`` (the state dict) and
``config.json`` (format version, aligner name, both shapes, constructor parameters, optional
user metadata).

``save`` writes both files under temporary names in the directory and only then moves them into
place (``os.replace``, the config last), so a save that fails part-way leaves the aligner that was
there before, if any, whole. ``load`` hands back the saved metadata as ``aligner.metadata``.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from proxykv._validation import dtype_name
from proxykv.align.base import Aligner, check_model_shape
from proxykv.align.registry import get_aligner

FORMAT = "proxykv-aligner"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"


def save(aligner: Aligner, path, *, metadata: dict | None = None) -> Path:
    """Write ``aligner`` into the directory ``path`` (created if needed; existing files of the same
    names are replaced). ``metadata`` is any JSON-serialisable dict kept with the config (e.g. the
    model names and the fit's metrics) and given back by ``load`` as ``aligner.metadata``. Returns
    the directory.

    Both files are written to temporary names first and moved into place only when both are
    complete (the config last), so an error during the save leaves an aligner saved there before
    unchanged and loadable."""
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
    temporary = []
    try:
        weights_tmp = _temporary(directory, WEIGHTS_FILE, temporary)
        save_file(weights, str(weights_tmp), metadata={"format": FORMAT})
        _sync(weights_tmp)
        config_tmp = _temporary(directory, CONFIG_FILE, temporary)
        with open(config_tmp, "w", encoding="utf-8") as file:
            file.write(text + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(weights_tmp, directory / WEIGHTS_FILE)
        os.replace(config_tmp, directory / CONFIG_FILE)  # last: the aligner's "commit"
    finally:
        for leftover in temporary:
            leftover.unlink(missing_ok=True)
    return directory


def _temporary(directory: Path, name: str, created: list[Path]) -> Path:
    """A new empty file beside ``directory / name`` (a hidden temporary name), noted in
    ``created`` so that it is removed if the save fails."""
    while True:
        temp = directory / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            with open(temp, "x"):  # created with the usual permissions (mkstemp's are 0600)
                pass
        except FileExistsError:
            continue
        created.append(temp)
        return temp


def _sync(path: Path) -> None:
    """Flush ``path``'s contents to disk before it replaces the saved file."""
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def read_config(path) -> dict:
    """The ``config.json`` of the aligner saved in the directory ``path``, checked for format,
    name, shapes and parameters (a dict).

    Raises ``FileNotFoundError`` when the file is missing and ``ValueError`` naming the file when it
    is not valid JSON or not such a config.
    """
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"no aligner config at {config_path} (expected a directory written "
                                f"by proxykv.align.save)")
    try:
        config = json.loads(config_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"aligner config {config_path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"aligner config {config_path} must hold a JSON object, got "
                         f"{type(config).__name__}")
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"aligner config {config_path} is not a {FORMAT} config of version "
                         f"{FORMAT_VERSION}, got format={config.get('format')!r} "
                         f"format_version={config.get('format_version')!r}")
    for key in ("aligner", "proxy_shape", "target_shape", "params"):
        if key not in config:
            raise ValueError(f"aligner config {config_path} lacks the field {key!r}")
    problem = _field_problem(config)
    if problem is not None:
        raise ValueError(f"aligner config {config_path}: {problem}")
    return config


def _field_problem(config: dict) -> str | None:
    """What is wrong with the types of a config's fields, or None."""
    if not isinstance(config["aligner"], str):
        return (f"aligner must be a string (a registered name), got "
                f"{type(config['aligner']).__name__} {config['aligner']!r}")
    for key in ("proxy_shape", "target_shape"):
        try:
            check_model_shape(key, config[key])
        except (TypeError, ValueError) as error:
            return str(error)
    for key in ("params", "metadata"):
        if not isinstance(config.get(key, {}), dict):
            return f"{key} must be a JSON object, got {type(config[key]).__name__}"
    return None


def load(path, *, proxy_shape=None, target_shape=None,
         map_location: torch.device | str = "cpu") -> Aligner:
    """Rebuild the aligner saved in the directory ``path`` on ``map_location``; its ``metadata``
    attribute holds the ``metadata`` dict it was saved with (``{}`` when none was given).

    ``proxy_shape`` / ``target_shape`` (``(layers, heads)``), when given, must equal the saved
    shapes: loading an aligner for other models raises ``ValueError``.

    A missing ``config.json`` or ``weights.safetensors`` raises ``FileNotFoundError``; a file that
    is unreadable or does not describe a buildable aligner (see ``read_config``; an unknown aligner
    name or parameter), or weights whose names, shapes or dtypes differ from the configured
    aligner's, raise ``ValueError`` naming the file.
    """
    config = read_config(path)
    config_path = Path(path) / CONFIG_FILE
    saved = {"proxy_shape": tuple(config["proxy_shape"]),
             "target_shape": tuple(config["target_shape"])}
    for name, expected in (("proxy_shape", proxy_shape), ("target_shape", target_shape)):
        if expected is not None and check_model_shape(name, expected) != saved[name]:
            raise ValueError(f"the aligner saved at {path} maps {saved['proxy_shape']} -> "
                             f"{saved['target_shape']} (layers, heads), but {name}="
                             f"{tuple(expected)} was requested")
    try:
        aligner = get_aligner(config["aligner"], saved["proxy_shape"], saved["target_shape"],
                              **config["params"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"aligner config {config_path}: {error}") from error
    weights_path = Path(path) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"no aligner weights at {weights_path}")
    try:
        weights = load_file(str(weights_path), device="cpu")
    except SafetensorError as error:
        raise ValueError(f"aligner weights {weights_path} are not a readable safetensors file: "
                         f"{error}") from error
    problems = _state_dict_differences(weights, aligner.state_dict())
    if problems:
        raise ValueError(f"the weights at {weights_path} do not fit the saved "
                         f"{config['aligner']!r} configuration: {'; '.join(problems)}")
    aligner.load_state_dict(weights, strict=True)
    aligner.metadata = config.get("metadata", {})
    return aligner.to(map_location)


def _state_dict_differences(weights: dict[str, torch.Tensor],
                            expected: dict[str, torch.Tensor]) -> list[str]:
    """What keeps ``weights`` from being loaded as ``expected`` exactly (``load_state_dict`` would
    silently convert dtypes)."""
    problems = [f"missing {key!r}" for key in expected if key not in weights]
    problems += [f"unexpected {key!r}" for key in weights if key not in expected]
    for key in expected.keys() & weights.keys():
        got, want = weights[key], expected[key]
        if got.shape != want.shape:
            problems.append(f"{key!r} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        elif got.dtype != want.dtype:
            problems.append(f"{key!r} is {dtype_name(got.dtype)}, expected "
                            f"{dtype_name(want.dtype)}")
    return problems
