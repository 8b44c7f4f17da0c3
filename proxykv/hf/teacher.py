"""Teacher data for the aligners: the proxy's scores and the target's own scores on the same
prompts, written to disk one prompt at a time, and read back in the form ``fit_aligner`` takes.

    record_teacher_scores(target, proxy, prompts, "teacher/")     # resumable
    data = TeacherData("teacher/")                                 # re-iterable of pairs
    fit_aligner(get_aligner("axial", data.proxy_shape, data.target_shape), data)

Layout of the folder: ``meta.json`` (the two models' ``(layers, KV heads)``, the scorers, the
count) and one ``sample_NNNNNN.safetensors`` per prompt holding ``proxy`` float32
``[1, Lp, Hp, T]`` and ``target`` float32 ``[1, Lt, Ht, T]`` log-scores (``to_log_scores`` of the
scorers' attention mass). A run that stops part-way resumes after the last complete sample; a
long run never holds more than one prompt's scores.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from proxykv.align import to_log_scores
from proxykv.hf.scorers import Scorer, _num_kv_heads, _num_layers, get_scorer

META = "meta.json"


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


def record_teacher_scores(target, proxy, prompts: Iterable, out, *,
                          teacher_scorer: str | Scorer = "reconstruction",
                          proxy_scorer: str | Scorer | None = None, tokenizer=None,
                          max_length: int | None = None, progress: bool = True) -> Path:
    """Score every prompt with the proxy and with the target (the teacher) and write the pairs.

    Args:
        target, proxy: transformers models of one family (same vocabulary).
        prompts: texts (with ``tokenizer``), id sequences or 1-D/``[1, T]`` id tensors.
        out: the folder (created; an existing one with the same models and scorers is resumed).
        teacher_scorer: the target's scorer (default KVzip's ``reconstruction``).
        proxy_scorer: the proxy's scorer (default: the teacher's).
        max_length: truncate longer prompts to their first ``max_length`` tokens.
        progress: a progress bar on stderr.

    Returns the folder. Raises ``ValueError`` if the folder holds data of other models/scorers.
    """
    from tqdm.auto import tqdm

    from proxykv.hf.pipeline import check_same_vocabulary

    check_same_vocabulary(target, proxy)
    teacher = get_scorer(teacher_scorer) if isinstance(teacher_scorer, str) else teacher_scorer
    proxy_scorer = teacher if proxy_scorer is None else proxy_scorer
    proxy_scorer = get_scorer(proxy_scorer) if isinstance(proxy_scorer, str) else proxy_scorer
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"proxy_shape": [_num_layers(proxy), _num_kv_heads(proxy)],
            "target_shape": [_num_layers(target), _num_kv_heads(target)],
            "teacher_scorer": repr(teacher), "proxy_scorer": repr(proxy_scorer),
            "max_length": max_length, "count": 0}
    meta_path = folder / META
    if meta_path.exists():
        previous = json.loads(meta_path.read_text())
        differing = [k for k in meta if k != "count" and previous.get(k) != meta[k]]
        if differing:
            raise ValueError(f"{folder} holds teacher data of other models or scorers "
                             f"({', '.join(differing)} differ); use another folder")
        meta["count"] = int(previous.get("count", 0))
    prompts = list(prompts)
    devices = (target.get_input_embeddings().weight.device,
               proxy.get_input_embeddings().weight.device)
    bar = tqdm(total=len(prompts), initial=min(meta["count"], len(prompts)),
               desc="teacher scores", disable=not progress, file=sys.stderr)
    for index in range(meta["count"], len(prompts)):
        ids = _as_ids(prompts[index], tokenizer, index, devices[0])
        if max_length is not None:
            ids = ids[:, :max_length]
        target_scores, _ = teacher.score(target, ids)
        proxy_scores, _ = proxy_scorer.score(proxy, ids.to(devices[1]))
        tensors = {"proxy": to_log_scores(proxy_scores).cpu().contiguous(),
                   "target": to_log_scores(target_scores).cpu().contiguous()}
        path = _sample_path(folder, index)
        partial = path.with_suffix(".partial")
        save_file(tensors, str(partial))
        os.replace(partial, path)  # a sample is on disk whole or not at all
        meta["count"] = index + 1
        meta_path.write_text(json.dumps(meta, indent=1))
        bar.update(1)
    bar.close()
    if not meta_path.exists():
        meta_path.write_text(json.dumps(meta, indent=1))
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


__all__ = ["TeacherData", "record_teacher_scores"]
