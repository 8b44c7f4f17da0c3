"""Train an aligner for a transformers model pair: record the teacher data, fit, save.

    report = train_aligner(target, proxy, prompts, "aligner/", aligner="axial")

is what ``proxykv align-train`` runs once it has checked its arguments and loaded the models, and
what the zoo runs for its committed ``linear`` and ``axial`` aligners
(``proxykv.zoo.aligners.train_aligners``): one function, so that the command line and the zoo
cannot train differently.
"""

from __future__ import annotations

from pathlib import Path

#: the least number of prompts: at least one sample trains and one is held out
MIN_PROMPTS = 2


class AlignerTrainingError(ValueError):
    """An input of ``train_aligner`` that cannot be used, found before or instead of a fit.

    ``argument`` names it: ``"prompts"`` (too few), ``"aligner"`` (the registered aligner cannot
    be built for the pair's shapes; the message is ``get_aligner``'s) or ``"data_dir"`` (the
    recorded teacher data cannot be fitted; the message is ``fit_aligner``'s)."""

    def __init__(self, message: str, argument: str):
        super().__init__(message)
        self.argument = argument


def check_prompt_count(count: int) -> None:
    """Raise ``AlignerTrainingError`` (argument ``"prompts"``) unless ``count`` prompts are
    enough to train and hold one out."""
    if count < MIN_PROMPTS:
        raise AlignerTrainingError(f"need at least {MIN_PROMPTS} prompts (one is held out), got "
                                   f"{count}", "prompts")


def held_out_every(val_fraction: float, samples: int) -> int:
    """Every how many samples one is held out: ``round(1 / val_fraction)``, at least 2 (so at
    least half of the samples train), and ``samples`` (exactly one held out) when
    ``val_fraction * samples < 1``."""
    if val_fraction * samples >= 1:
        return max(2, round(1 / val_fraction))
    return samples


def build_aligner(name: str, proxy_shape, target_shape):
    """``get_aligner(name, proxy_shape, target_shape)``; one that cannot be built for these
    shapes raises ``AlignerTrainingError`` (argument ``"aligner"``) with ``get_aligner``'s
    message."""
    from proxykv.align import get_aligner

    try:
        return get_aligner(name, proxy_shape, target_shape)
    except (TypeError, ValueError) as error:
        raise AlignerTrainingError(str(error), "aligner") from None


def train_aligner(target, proxy, prompts, out, *, aligner: str = "axial", data_dir=None,
                  tokenizer=None, teacher_scorer="reconstruction", max_length: int | None = None,
                  epochs: int = 200, max_seconds: float | None = None, val_fraction: float = 0.2,
                  seed: int = 0, device=None, metadata: dict | None = None,
                  progress: bool = True) -> dict:
    """Record teacher scores of a model pair on ``prompts``, fit a registered aligner on them
    and save it.

    Args:
        target: the loaded transformers model whose cache the aligner serves.
        proxy: a smaller loaded model of the same family (same vocabulary).
        prompts: at least 2; texts (with ``tokenizer``), id sequences or id tensors, as
            ``record_teacher_scores`` takes them.
        out: the folder the aligner is saved into (``Aligner.save``).
        aligner: the registered aligner to fit (``available_aligners()``).
        data_dir: the teacher-data folder (default ``out/teacher``), resumed by a later call on
            the same models, scorer, ``max_length`` and prompts (``record_teacher_scores``).
        tokenizer: encodes text prompts (``record_teacher_scores``).
        teacher_scorer: the target's scorer, also the proxy's (``record_teacher_scores``;
            default KVzip's ``reconstruction``).
        max_length: truncate longer prompts to their first ``max_length`` tokens.
        epochs: most epochs of a gradient fit (``fit_aligner``).
        max_seconds: stop fitting after this much wall time (``fit_aligner``).
        val_fraction: every ``held_out_every(val_fraction, samples)``-th sample is held out for
            early stopping and the reported metrics: at least one, at most half.
        seed: of ``fit_aligner``'s shuffling and of the aligner's initial weights
            (``torch.manual_seed``), so a run is reproducible from it.
        device: where the aligner is fitted (default: the target's device).
        metadata: recorded first in the saved ``config.json``'s metadata (e.g. the command that
            ran); then the pair's ``target_fingerprint`` / ``proxy_fingerprint`` (``ProxyKV``
            warns when the aligner is loaded for another pair), ``samples``, ``held_out``,
            ``method``, ``epochs``, ``seconds`` and ``metrics``.
        progress: progress bars on stderr while recording and fitting.

    Returns the report ``{"aligner", "out", "samples", "epochs", "metrics"}`` (held-out
    metrics, see ``FitResult``).

    Raises ``AlignerTrainingError`` (a ``ValueError``) naming the argument for too few prompts,
    an aligner the pair's shapes do not fit, and teacher data the fit cannot use (said before
    any step); ``record_teacher_scores``' ``ValueError`` for prompts, models or a data folder
    that cannot be resumed.
    """
    import torch

    from proxykv.align import fit_aligner
    from proxykv.hf.teacher import TeacherData, record_teacher_scores

    prompts = list(prompts)
    check_prompt_count(len(prompts))
    out = Path(out)
    data_dir = Path(data_dir) if data_dir is not None else out / "teacher"
    if device is None:
        device = next(target.parameters()).device
    record_teacher_scores(target, proxy, prompts, data_dir, tokenizer=tokenizer,
                          teacher_scorer=teacher_scorer, max_length=max_length,
                          progress=progress)
    data = TeacherData(data_dir)  # one sample per prompt: at least 2, checked above
    train, held_out = data.split(held_out_every(val_fraction, len(data)))
    torch.manual_seed(seed)  # the aligner's initial weights: reproducible from the seed
    fitted = build_aligner(aligner, data.proxy_shape, data.target_shape).to(device)
    try:
        result = fit_aligner(fitted, train, val_data=held_out, epochs=epochs,
                             max_seconds=max_seconds, seed=seed, progress=progress)
    except ValueError as error:  # data the fit cannot use, said before any step
        raise AlignerTrainingError(str(error), "data_dir") from None
    pair = {key: data.meta[key] for key in ("target_fingerprint", "proxy_fingerprint")
            if key in data.meta}
    fitted.save(out, metadata={**(metadata or {}), **pair, "samples": len(data),
                               "held_out": len(held_out), "method": result.method,
                               "epochs": result.epochs, "seconds": round(result.seconds, 1),
                               "metrics": result.metrics})
    return {"aligner": aligner, "out": str(out), "samples": len(data), "epochs": result.epochs,
            "metrics": result.metrics}


__all__ = ["MIN_PROMPTS", "AlignerTrainingError", "build_aligner", "check_prompt_count",
           "held_out_every", "train_aligner"]
