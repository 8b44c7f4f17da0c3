"""Teacher data for the aligners: the proxy's scores and the target's own scores on the same
prompts, written to disk one prompt at a time, and read back in the form ``fit_aligner`` takes.

    record_teacher_scores(target, proxy, prompts, "teacher/")     # resumable
    data = TeacherData("teacher/")                                 # re-iterable of pairs
    fit_aligner(get_aligner("axial", data.proxy_shape, data.target_shape), data)

Layout of the folder: ``meta.json`` and one ``sample_NNNNNN.safetensors`` per prompt holding
``proxy`` float32 ``[1, Lp, Hp, T]`` and ``target`` float32 ``[1, Lt, Ht, T]`` log-scores
(``to_log_scores`` of the scorers' attention mass). A long run never holds more than one prompt's
scores.

``meta.json`` (format ``proxykv-teacher`` version 2) records what the samples were computed from:
both models' ``(layers, KV heads)``, descriptions (``describe_model``), fingerprints
(``model_fingerprint``: class, configuration and weights) and configuration fingerprints, the two
scorers' reprs, ``max_length``, one hash per recorded sample of its prompt's token ids (after
tokenization and truncation), the number of prompts of the latest run (``requested``) and the
number of samples on disk (``count``).

Resuming: a run that stops part-way resumes after the last complete sample when it is given the
same models (configuration and weights), scorers and ``max_length``, and prompts whose first
``count`` equal the recorded samples' prompts. More prompts than before (the recorded ones first)
resume and extend the data. Anything else -- other models, even of the same shapes, other
scorers, another ``max_length``, other prompts, fewer prompts than samples on disk, or a folder of
the previous format, which records no fingerprints -- raises ``ValueError`` before any scoring,
naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from proxykv.align import to_log_scores
from proxykv.hf.architectures import compressible_shape
from proxykv.hf.identity import config_fingerprint, describe_model, model_fingerprint
from proxykv.hf.scorers import Scorer, get_scorer

META = "meta.json"
META_FORMAT = "proxykv-teacher"
META_VERSION = 2
#: How ``prompt_hashes`` are computed (recorded in ``meta.json``).
PROMPT_HASH = "blake2b-128 of the prompt's token ids as int64 little-endian"
_FRESH = "Use another --out/--data folder or delete {folder} to start fresh."


def _sample_path(folder: Path, index: int) -> Path:
    return folder / f"sample_{index:06d}.safetensors"


def _as_ids(prompt, tokenizer, index: int, device) -> torch.Tensor:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(f"prompts[{index}] is text, which needs tokenizer=")
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    elif isinstance(prompt, torch.Tensor):
        ids = prompt.reshape(1, -1) if prompt.dim() == 1 else prompt
    elif isinstance(prompt, Sequence):
        ids = torch.tensor([list(prompt)], dtype=torch.long)
    else:
        raise TypeError(f"prompts[{index}] must be text, a sequence of ids or a tensor, got "
                        f"{type(prompt).__name__}")
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ValueError(f"prompts[{index}] must be one non-empty prompt, got shape "
                         f"{tuple(ids.shape)}")
    return ids.to(device)


def _prompt_ids(prompt, tokenizer, index: int, device, max_length: int | None) -> torch.Tensor:
    """``[1, T]`` token ids of one prompt as they are scored (tokenized, truncated)."""
    ids = _as_ids(prompt, tokenizer, index, device)
    return ids if max_length is None else ids[:, :max_length]


def prompt_hash(ids) -> str:
    """Hex hash of a prompt's token ids (any integer tensor or sequence; see ``PROMPT_HASH``): equal
    for equal id sequences whatever their container or integer dtype."""
    ids = torch.as_tensor(ids).detach().to("cpu", torch.int64).contiguous().reshape(-1)
    data = ids.numpy().astype("<i8", copy=False).tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _write_meta(path: Path, meta: dict) -> None:
    """Replace ``meta.json`` whole (a crash never leaves it half-written)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(meta, indent=1))
    os.replace(partial, path)


def _short(fingerprint) -> str:
    return f"{fingerprint[:12]}…" if isinstance(fingerprint, str) else repr(fingerprint)


def _model_difference(side: str, previous: dict, meta: dict) -> str | None:
    """How the ``side`` ("target"/"proxy") model differs from the recorded one, or None."""
    key = f"{side}_fingerprint"
    if previous.get(key) == meta[key]:
        return None
    old, new = previous.get(side) or {}, meta[side]
    fields = [f"{name} {old.get(name)!r} vs {new[name]!r}" for name in new
              if old.get(name) != new[name]]
    if fields:
        return f"the {side} model differs ({', '.join(fields)}; recorded vs given)"
    what = ("configuration differs" if previous.get(f"{side}_config_fingerprint")
            != meta[f"{side}_config_fingerprint"] else "weights differ")
    return (f"the {side}'s {what} (fingerprint {_short(previous.get(key))} recorded vs "
            f"{_short(meta[key])} given)")


def _differences(previous: dict, meta: dict, hashes: list[str]) -> list[str]:
    """What keeps the folder described by ``previous`` from being resumed as ``meta`` with prompts
    of ``hashes`` (empty: it can be resumed)."""
    if previous.get("format") != META_FORMAT or previous.get("format_version") != META_VERSION:
        return [("it was written in an older format that records no model or prompt "
                 "fingerprints, so it cannot be verified to belong to these models and prompts")]
    problems = []
    for side in ("target", "proxy"):
        if previous.get(f"{side}_shape") != meta[f"{side}_shape"]:
            problems.append(f"the {side}'s (layers, KV heads) differ "
                            f"({tuple(previous.get(f'{side}_shape') or ())} recorded vs "
                            f"{tuple(meta[f'{side}_shape'])} given)")
        else:
            difference = _model_difference(side, previous, meta)
            if difference:
                problems.append(difference)
    for key, what in (("teacher_scorer", "teacher scorer"), ("proxy_scorer", "proxy scorer"),
                      ("max_length", "max_length"), ("prompt_hash", "prompt hash")):
        if previous.get(key) != meta[key]:
            problems.append(f"the {what} differs ({previous.get(key)!r} recorded vs "
                            f"{meta[key]!r} given)")
    recorded = previous.get("prompt_hashes")
    count = previous.get("count")
    if not isinstance(recorded, list) or not isinstance(count, int) or len(recorded) != count:
        problems.append("its prompt hashes do not match its sample count")
    elif len(hashes) < count:
        problems.append(f"it holds {count} recorded samples but only {len(hashes)} prompts are "
                        f"given")
    else:
        pairs = zip(recorded, hashes[:count], strict=True)
        first = next((i for i, (old, new) in enumerate(pairs) if old != new), None)
        if first is not None:
            problems.append(f"the prompts differ from sample {first} on (prompts[{first}] is not "
                            f"the prompt recorded as {_sample_path(Path(), first).name})")
    return problems


def record_teacher_scores(target, proxy, prompts: Iterable, out, *,
                          teacher_scorer: str | Scorer = "reconstruction",
                          proxy_scorer: str | Scorer | None = None, tokenizer=None,
                          max_length: int | None = None, progress: bool = True) -> Path:
    """Score every prompt with the proxy and with the target (the teacher) and write the pairs.

    Args:
        target, proxy: transformers models of one family (same vocabulary).
        prompts: texts (with ``tokenizer``), id sequences or 1-D/``[1, T]`` id tensors.
        out: the folder (created). A folder that already holds teacher data is resumed when its
            ``meta.json`` records the same models (configuration and weights: their
            ``model_fingerprint``), scorers and ``max_length``, and its samples' prompts are the
            first prompts given now; more prompts than recorded extend the data.
        teacher_scorer: the target's scorer (default KVzip's ``reconstruction``).
        proxy_scorer: the proxy's scorer (default: the teacher's).
        max_length: truncate longer prompts to their first ``max_length`` tokens.
        progress: a progress bar on stderr.

    Returns the folder. Raises ``ValueError`` before any scoring when the folder holds data that
    cannot be resumed with these inputs (other models, even of the same shapes, other scorers or
    ``max_length``, other or fewer prompts, a ``meta.json`` of the previous format), naming what
    differs; and when a prompt is not valid (every prompt is read before any scoring).
    Fingerprinting reads every weight of both models once (about 1 GB/s).
    """
    from tqdm.auto import tqdm

    from proxykv.hf.pipeline import check_same_vocabulary

    check_same_vocabulary(target, proxy)
    teacher = get_scorer(teacher_scorer) if isinstance(teacher_scorer, str) else teacher_scorer
    proxy_scorer = teacher if proxy_scorer is None else proxy_scorer
    proxy_scorer = get_scorer(proxy_scorer) if isinstance(proxy_scorer, str) else proxy_scorer
    prompts = list(prompts)
    # every prompt read (and checked) once, before any scoring; token ids are small
    prompt_ids = [_prompt_ids(prompt, tokenizer, index, "cpu", max_length)
                  for index, prompt in enumerate(prompts)]
    hashes = [prompt_hash(ids) for ids in prompt_ids]
    meta = {"format": META_FORMAT, "format_version": META_VERSION,
            "proxy_shape": list(compressible_shape(proxy)),
            "target_shape": list(compressible_shape(target)),
            "target": describe_model(target), "proxy": describe_model(proxy),
            "target_fingerprint": model_fingerprint(target),
            "target_config_fingerprint": config_fingerprint(target),
            "proxy_fingerprint": model_fingerprint(proxy),
            "proxy_config_fingerprint": config_fingerprint(proxy),
            "teacher_scorer": repr(teacher), "proxy_scorer": repr(proxy_scorer),
            "max_length": max_length, "prompt_hash": PROMPT_HASH, "requested": len(prompts),
            "count": 0, "prompt_hashes": []}
    folder = Path(out)
    meta_path = folder / META
    if meta_path.exists():
        try:
            previous = json.loads(meta_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{meta_path} is not a teacher-data description ({error}). "
                             f"{_FRESH.format(folder=folder)}") from None
        problems = (_differences(previous, meta, hashes) if isinstance(previous, dict)
                    else ["its meta.json is not a JSON object"])
        if problems:
            raise ValueError(f"{folder} holds teacher data that this run cannot resume: "
                             f"{'; '.join(problems)}. {_FRESH.format(folder=folder)}")
        meta["count"], meta["prompt_hashes"] = previous["count"], previous["prompt_hashes"]
    folder.mkdir(parents=True, exist_ok=True)
    _write_meta(meta_path, meta)  # claims the folder for these inputs before the first sample
    devices = (target.get_input_embeddings().weight.device,
               proxy.get_input_embeddings().weight.device)
    bar = tqdm(total=len(prompts), initial=meta["count"], desc="teacher scores",
               disable=not progress, file=sys.stderr)
    for index in range(meta["count"], len(prompts)):
        ids = prompt_ids[index].to(devices[0])
        target_scores, _ = teacher.score(target, ids)
        proxy_scores, _ = proxy_scorer.score(proxy, ids.to(devices[1]))
        tensors = {"proxy": to_log_scores(proxy_scores).cpu().contiguous(),
                   "target": to_log_scores(target_scores).cpu().contiguous()}
        path = _sample_path(folder, index)
        partial = path.with_suffix(".partial")
        save_file(tensors, str(partial))
        os.replace(partial, path)  # a sample is on disk whole or not at all
        meta["count"] = index + 1
        meta["prompt_hashes"].append(hashes[index])
        _write_meta(meta_path, meta)
        bar.update(1)
    bar.close()
    return folder


class TeacherData:
    """The pairs of a ``record_teacher_scores`` folder as a re-iterable of ``(proxy [1, Lp, Hp,
    T], target [1, Lt, Ht, T])`` float32 batches (one prompt each, read from disk on each pass):
    the iterable form ``fit_aligner`` takes. ``indices`` selects a subset of the samples."""

    def __init__(self, folder, indices: Sequence[int] | None = None):
        self.folder = Path(folder)
        meta_path = self.folder / META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: not a teacher-data folder")
        try:
            self.meta = json.loads(meta_path.read_text())
            count = int(self.meta["count"])
            self.proxy_shape = tuple(self.meta["proxy_shape"])
            self.target_shape = tuple(self.meta["target_shape"])
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{meta_path} is not a teacher-data description: {error}") from None
        self.indices = list(range(count)) if indices is None else list(indices)
        missing = [i for i in self.indices if not _sample_path(self.folder, i).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.folder} lacks sample(s) {missing[:5]}")

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in self.indices:
            path = _sample_path(self.folder, index)
            try:
                tensors = load_file(str(path))
                yield tensors["proxy"], tensors["target"]
            except Exception as error:  # safetensors raises its own error type
                raise ValueError(f"{path} is not a teacher sample: {error}") from None

    def split(self, every: int) -> tuple[TeacherData, TeacherData]:
        """``(train, held_out)``: every ``every``-th sample held out."""
        held = self.indices[::every]
        train = [i for i in self.indices if i not in set(held)]
        return TeacherData(self.folder, train), TeacherData(self.folder, held)


__all__ = ["TeacherData", "prompt_hash", "record_teacher_scores"]
