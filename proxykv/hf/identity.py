"""Identity of a transformers model: a fingerprint of what it computes, and a short description.

``model_fingerprint(model)`` is a hex SHA-256 digest of the model's class name, its configuration
and every parameter's and persistent buffer's name, shape, dtype and bytes. Two models get the same
fingerprint exactly when they are the same class with the same configuration and bit-identical
weights, wherever they were loaded from, on whichever device, and whatever their attention
implementation. ``record_teacher_scores`` stores the fingerprints of the proxy and the target so
that a folder of teacher data is only resumed with the models it was recorded with.

What the configuration part leaves out, and why (recursively, in sub-configurations too):

* every key starting with ``_``: loader and runtime state, not the model -- ``_name_or_path``
  (where it was loaded from), ``_commit_hash``, ``_attn_implementation*`` (switched at run time
  by ``set_attn_implementation``; proxykv's own capture and compressed attention switch it);
* ``transformers_version``: the library that wrote or built the config;
* ``architectures``: written by ``save_pretrained`` and absent from a model built from a config;
  the class name is hashed directly;
* ``dtype`` / ``torch_dtype``: a record of how the model was loaded, which is not kept up to date
  by ``model.to(dtype)``; every tensor's actual dtype is hashed instead;
* ``use_cache``, ``output_attentions``, ``output_hidden_states``, ``return_dict``: default
  arguments of ``forward``, not part of the function it computes.

Parameters tied to each other (e.g. a tied ``lm_head``) are hashed once, under the first name
``named_parameters`` gives them. Non-persistent buffers (rotary ``inv_freq``, masks) are derived
from the configuration and may differ in their last bits with the device they were computed on, so
only their names, shapes and dtypes are hashed. Tensors on the ``meta`` device (weights offloaded
or not yet loaded) have no bytes to hash: ``ValueError``.

Cost: one pass over every byte of the weights. Each tensor is copied to the CPU (when it is not
there) and hashed with SHA-256, on up to four threads (``hashlib`` releases the GIL for large
buffers). Measured on a 2-core x86 CPU with SHA instructions: 1.1-1.35 GB/s, i.e. 0.72-0.9 s for a
975 MB float32 model (0.75-0.8 GB/s while other jobs loaded the machine; SHA-256 alone: about
1.1 GB/s per core); more cores help with large models.
A model on a GPU adds its device-to-host copy. ``config_fingerprint`` costs well under 1 ms.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import torch

#: Configuration keys that describe where or how a model was loaded or run, not what it computes.
IGNORED_CONFIG_KEYS = frozenset({"transformers_version", "architectures", "dtype", "torch_dtype",
                                 "use_cache", "output_attentions", "output_hidden_states",
                                 "return_dict"})
_MAX_THREADS = 4


def _canonical(value):
    """``value`` (a config dict) without the ignored keys, in a JSON-serialisable form."""
    if isinstance(value, dict):
        return {str(key): _canonical(item) for key, item in value.items()
                if not (isinstance(key, str) and (key.startswith("_")
                                                  or key in IGNORED_CONFIG_KEYS))}
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_canonical(item) for item in value), key=repr)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    if hasattr(value, "to_dict"):  # a nested config object
        return _canonical(value.to_dict())
    return f"{type(value).__name__}:{value}"


def _config_dict(model) -> dict:
    config = getattr(model, "config", None)
    if config is None:
        return {}
    return _canonical(config.to_dict() if hasattr(config, "to_dict") else dict(vars(config)))


def _config_text(model) -> str:
    return json.dumps({"class": type(model).__name__, "config": _config_dict(model)},
                      sort_keys=True, separators=(",", ":"), allow_nan=True)


def config_fingerprint(model) -> str:
    """Hex SHA-256 of the model's class name and configuration alone (see the module docstring for
    the keys left out). Cheap; tells a configuration change from a weights change."""
    return hashlib.sha256(_config_text(model).encode()).hexdigest()


def _tensors(model) -> list[tuple[str, torch.Tensor, bool]]:
    """``(name, tensor, hash_bytes)`` of every parameter (tied ones once) and buffer, by name."""
    entries = [(name, parameter, True) for name, parameter in model.named_parameters()]
    for module_name, module in model.named_modules():
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        for name, buffer in module._buffers.items():
            if buffer is not None:
                full = f"{module_name}.{name}" if module_name else name
                entries.append((full, buffer, name not in non_persistent))
    seen, unique = set(), []
    for name, tensor, hash_bytes in entries:  # a buffer shared by modules: once, like parameters
        if name not in seen:
            seen.add(name)
            unique.append((name, tensor, hash_bytes))
    return sorted(unique, key=lambda entry: entry[0])


def _tensor_digest(name: str, tensor: torch.Tensor) -> bytes:
    if tensor.device.type == "meta":
        raise ValueError(f"cannot fingerprint the model: {name} is on the meta device (offloaded "
                         f"or not loaded), so its values are unknown")
    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256()
    if data.numel():
        digest.update(memoryview(data.view(torch.uint8).numpy()))
    return digest.digest()


def model_fingerprint(model) -> str:
    """Hex SHA-256 digest (64 characters) of ``model``'s class name, configuration and tensors.

    Deterministic: the same model gives the same digest on every call, after
    ``set_attn_implementation``, after ``save_pretrained`` / ``from_pretrained`` of the same
    weights, and on any device; a change of one bit of one weight, of a shape or dtype, or of a
    configuration value changes it. See the module docstring for what is left out and the cost.

    Raises ``ValueError`` when a tensor is on the ``meta`` device.
    """
    entries = _tensors(model)
    hashed = [(name, tensor) for name, tensor, hash_bytes in entries if hash_bytes]
    threads = max(1, min(_MAX_THREADS, os.cpu_count() or 1, len(hashed)))
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            digests = list(pool.map(lambda item: _tensor_digest(*item), hashed))
    else:
        digests = [_tensor_digest(*item) for item in hashed]
    by_name = dict(zip((name for name, _ in hashed), digests, strict=True))
    outer = hashlib.sha256()
    outer.update(_config_text(model).encode())
    for name, tensor, _ in entries:
        header = f"\n{name}|{tuple(tensor.shape)}|{tensor.dtype}|"
        outer.update(header.encode())
        outer.update(by_name.get(name, b"-"))
    return outer.hexdigest()


def describe_model(model) -> dict:
    """A short, JSON-serialisable description for messages: ``class``, ``model_type``, ``layers``,
    ``kv_heads``, ``hidden_size``, ``vocab_size`` (None where the config lacks one)."""
    config = getattr(model, "config", None)

    def get(*names):
        for name in names:
            value = getattr(config, name, None)
            if value is not None:
                return value
        return None

    return {"class": type(model).__name__, "model_type": get("model_type"),
            "layers": get("num_hidden_layers"),
            "kv_heads": get("num_key_value_heads", "num_attention_heads"),
            "hidden_size": get("hidden_size"), "vocab_size": get("vocab_size")}


__all__ = ["IGNORED_CONFIG_KEYS", "config_fingerprint", "describe_model", "model_fingerprint"]
