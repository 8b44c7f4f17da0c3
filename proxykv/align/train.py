"""Fitting and evaluating aligners on (proxy scores, teacher scores) pairs.

Data comes either as two tensors ``proxy_scores [N, Lp, Hp, T]`` and ``target_scores
[N, Lt, Ht, T]`` (log-scores, float32 or float64 read as float32, on any CPU or CUDA device; batches
are moved to the aligner's device), or as a re-iterable (a list, a ``DataLoader``) of
``(proxy_batch, target_batch)`` pairs passed as ``proxy_scores`` with ``target_scores=None``, for
data that does not fit in memory; batches may differ in ``T``. Proxy and teacher must mark the same
positions invalid (a ``-inf`` in any channel of a sample at token ``t`` on one side needs one on the
other).

The data is checked once, before any training step: tensors up front, an iterable on a first pass
of its own. Empty data (``N = 0``, ``T = 0``, no batch) and NaN or ``+inf`` scores raise
``ValueError`` naming the tensor, the batch (iterables) and the first bad position
``[sample, layer, head, token]``. Later passes over an iterable check only shapes and dtypes.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from proxykv._validation import check_choice, check_float, check_int
from proxykv.align._ranking import check_keep_ratios
from proxykv.align.base import Aligner, all_channels_valid, check_scores
from proxykv.align.losses import MultiGranularityLoss, TeacherTargets
from proxykv.align.metrics import DEFAULT_KEEP_RATIOS, per_head_spearman, topk_recall

FIT_METHODS = ("auto", "gradient", "closed_form")
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class FitResult:
    """What ``fit_aligner`` did and how well the fitted aligner does.

    ``metrics``: ``evaluate_aligner`` on the held-out data (``evaluated_on == "held_out"`` or
    ``"val_data"``), or on the training data when there is none (``"train"``), plus ``loss`` there.
    ``history``: one dict per evaluation (epoch, step, train_loss, val_loss, seconds).
    """

    metrics: dict[str, float]
    method: str
    evaluated_on: str
    epochs: int = 0
    steps: int = 0
    best_epoch: int | None = None
    stopped_early: bool = False
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


def _device_of(aligner: Aligner) -> torch.device:
    return aligner.device or torch.device("cpu")


def check_pair(aligner: Aligner, proxy, target, names: tuple[str, str], *, samples: str = "N",
               check_values: bool = True) -> Batch:
    """Validate one ``(proxy, target)`` pair for ``aligner`` (see ``check_scores``; ``names`` name
    the two in messages); returns both as float32. With ``check_values`` (two device syncs) also
    their values: finite or ``-inf``, and the same positions invalid on both sides."""
    proxy_name, target_name = names
    proxy = check_scores(proxy_name, proxy, aligner.proxy_shape, "proxy", samples=samples,
                         check_values=check_values)
    target = check_scores(target_name, target, aligner.target_shape, "target", samples=samples,
                          check_values=check_values)
    if proxy.shape[0] != target.shape[0] or proxy.shape[-1] != target.shape[-1]:
        raise ValueError(f"{proxy_name} and {target_name} must have the same number of samples "
                         f"{samples} and tokens T, got shapes {tuple(proxy.shape)} and "
                         f"{tuple(target.shape)}")
    if not check_values:
        return proxy, target
    count, length = proxy.shape[0], proxy.shape[-1]
    proxy_valid = all_channels_valid(proxy.reshape(count, -1, length))
    target_valid = all_channels_valid(target.to(proxy.device).reshape(count, -1, length))
    mismatch = proxy_valid != target_valid
    if bool(mismatch.any()):
        sample, _, token = (int(i) for i in mismatch.nonzero()[0])
        raise ValueError(f"{proxy_name} and {target_name} must mark the same positions invalid "
                         f"(-inf in some channel); they differ at {int(mismatch.sum())} "
                         f"position(s), the first at sample {sample}, token {token}")
    return proxy, target


def _pair_names(source: str, batch: int | None = None) -> tuple[str, str]:
    """How messages name the two sides of the data given as ``source`` (``"proxy_scores"`` for the
    training data, or ``"val_data"``), of its batch ``batch`` for an iterable."""
    prefix = "" if source == "proxy_scores" else f"{source}: "
    where = "" if batch is None else f" (batch {batch})"
    return f"{prefix}proxy_scores{where}", f"{prefix}target_scores{where}"


class _TensorData:
    """Samples ``indices`` of two checked float32 tensors, in batches moved to the aligner's
    device.

    With a loss, targets come as ``TeacherTargets`` prepared once for all these samples."""

    def __init__(self, aligner: Aligner, proxy: torch.Tensor, target: torch.Tensor,
                 indices: torch.Tensor, batch_size: int):
        self.aligner, self.proxy, self.target = aligner, proxy, target
        self.indices, self.batch_size = indices, batch_size
        self._prepared: TeacherTargets | None = None

    def _prepare(self, loss: MultiGranularityLoss) -> TeacherTargets:
        device = _device_of(self.aligner)
        parts = [loss.prepare(self.target[chunk.to(self.target.device)].to(device))
                 .to(self.target.device) for chunk in self.indices.split(self.batch_size)]
        return TeacherTargets.concatenate(parts)

    def batches(self, generator: torch.Generator | None = None,
                loss: MultiGranularityLoss | None = None) -> Iterator[Batch]:
        if loss is not None and (self._prepared is None
                                 or self._prepared.settings != loss._settings()):
            self._prepared = self._prepare(loss)
        positions = torch.arange(len(self.indices)) if generator is None else \
            torch.randperm(len(self.indices), generator=generator)
        device = _device_of(self.aligner)
        for chosen in positions.split(self.batch_size):
            proxy = self.proxy[self.indices[chosen].to(self.proxy.device)].to(device)
            if loss is None:
                yield proxy, self.target[self.indices[chosen].to(self.target.device)].to(device)
            else:
                yield proxy, self._prepared.select(chosen).to(device)

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()


class _IterableData:
    """The batches of a re-iterable of ``(proxy, target)`` pairs whose index passes ``keep``, as
    float32 on the aligner's device. Their values were checked by ``_check_batches``; each pass
    checks shapes and dtypes again (a ``DataLoader`` may build new tensors every time)."""

    def __init__(self, aligner: Aligner, source: Iterable, name: str, count: int,
                 keep: Callable[[int], bool] = lambda index: True):
        self.aligner, self.source, self.name, self.keep = aligner, source, name, keep
        self.count = count  # batches on the checking pass, before ``keep``

    def batches(self, generator: torch.Generator | None = None,
                loss: MultiGranularityLoss | None = None) -> Iterator[Batch]:
        device = _device_of(self.aligner)
        for index, item in enumerate(self.source):
            if self.keep(index):
                proxy, target = _check_batch(self.aligner, self.name, index, item,
                                             check_values=False)
                yield proxy.to(device), target.to(device)

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()

    def subset(self, keep: Callable[[int], bool]) -> _IterableData:
        return _IterableData(self.aligner, self.source, self.name, self.count, keep)


def _check_batch(aligner: Aligner, name: str, index: int, item, *, check_values: bool) -> Batch:
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise TypeError(f"each batch must be a (proxy_scores, target_scores) pair, got "
                        f"{type(item).__name__} at batch {index} of {name}")
    return check_pair(aligner, item[0], item[1], _pair_names(name, index), samples="B",
                      check_values=check_values)


def _check_batches(aligner: Aligner, source: Iterable, name: str) -> int:
    """The checking pass over an iterable of batches: every batch in full; returns their count."""
    count = 0
    for index, item in enumerate(source):
        _check_batch(aligner, name, index, item, check_values=True)
        count += 1
    if count == 0:
        raise ValueError(f"{name} yielded no batch; it needs at least one (proxy_scores, "
                         f"target_scores) pair")
    return count


_Data = _TensorData | _IterableData


def _as_data(aligner: Aligner, proxy_scores, target_scores, batch_size: int,
             name: str) -> _Data:
    """All of ``proxy_scores``/``target_scores`` (tensors or an iterable of pairs) as one source,
    checked in full (an iterable on a pass of its own)."""
    if isinstance(proxy_scores, torch.Tensor):
        if target_scores is None:
            raise ValueError(f"{name}: target_scores is required when proxy_scores is a tensor")
        proxy, target = check_pair(aligner, proxy_scores, target_scores, _pair_names(name))
        return _TensorData(aligner, proxy, target, torch.arange(proxy.shape[0]), batch_size)
    if target_scores is not None:
        raise TypeError(f"{name}: with target_scores given, proxy_scores must be a tensor, got "
                        f"{type(proxy_scores).__name__}; pass an iterable of (proxy, target) "
                        f"pairs alone instead")
    _check_reiterable(name, proxy_scores)
    return _IterableData(aligner, proxy_scores, name, _check_batches(aligner, proxy_scores, name))


def _check_reiterable(name: str, source) -> None:
    if not isinstance(source, Iterable):
        raise TypeError(f"{name} must be a tensor or a re-iterable of (proxy, target) pairs, got "
                        f"{type(source).__name__}")
    if isinstance(source, Iterator):
        raise TypeError(f"{name} must be re-iterable (a list, a DataLoader), got a one-shot "
                        f"{type(source).__name__}: it is read once per epoch")


def _split(aligner: Aligner, proxy_scores, target_scores, val_fraction: float, val_data,
           batch_size: int, seed: int) -> tuple[_Data, _Data | None, str]:
    """(training data, held-out data or None, what the final metrics are computed on)."""
    if val_data is not None:
        train = _as_data(aligner, proxy_scores, target_scores, batch_size, "proxy_scores")
        if isinstance(val_data, (tuple, list)) and len(val_data) == 2 and all(
                isinstance(t, torch.Tensor) for t in val_data):
            held_out = _as_data(aligner, val_data[0], val_data[1], batch_size, "val_data")
        else:
            held_out = _as_data(aligner, val_data, None, batch_size, "val_data")
        return train, held_out, "val_data"
    data = _as_data(aligner, proxy_scores, target_scores, batch_size, "proxy_scores")
    if val_fraction == 0:
        return data, None, "train"
    if isinstance(data, _TensorData):
        samples = len(data.indices)
        held = round(val_fraction * samples)
        if not 1 <= held < samples:
            raise ValueError(f"val_fraction={val_fraction} of {samples} sample(s) leaves no "
                             f"held-out or no training sample; it needs at least "
                             f"{_samples_for_split(val_fraction)} samples; pass more samples, "
                             f"val_data, or val_fraction=0")
        order = torch.randperm(samples, generator=torch.Generator().manual_seed(seed))
        return (_TensorData(aligner, data.proxy, data.target, order[held:], batch_size),
                _TensorData(aligner, data.proxy, data.target, order[:held], batch_size),
                "held_out")
    # Every period-th batch is held out (deterministic, whatever order the iterable has).
    period = max(2, round(1 / val_fraction))
    if data.count < period:
        raise ValueError(f"val_fraction={val_fraction} holds out one batch in every {period}, but "
                         f"proxy_scores yielded {data.count} batch(es); it needs at least "
                         f"{period}; pass more batches, val_data, or val_fraction=0")

    def held_out_batch(index: int) -> bool:
        return index % period == period - 1

    return (data.subset(lambda index: not held_out_batch(index)), data.subset(held_out_batch),
            "held_out")


def _samples_for_split(val_fraction: float) -> int:
    """The fewest samples that ``round(val_fraction * N)`` splits into a held-out and a training
    part, both non-empty."""
    # Each part needs at least half a sample before rounding: a lower bound, then count up.
    samples = max(2, math.floor(0.5 / val_fraction), math.floor(0.5 / (1 - val_fraction)))
    while not 1 <= round(val_fraction * samples) < samples:
        samples += 1
    return samples


@torch.no_grad()
def evaluate_aligner(aligner: Aligner, proxy_scores, target_scores=None, *,
                     keep_ratios=DEFAULT_KEEP_RATIOS, batch_size: int = 8,
                     loss: MultiGranularityLoss | None = None) -> dict[str, float]:
    """Metrics of ``aligner`` on data (tensors or an iterable of pairs, see the module docstring):

    * ``recall@r``: mean per-head top-k recall (``topk_recall(scope="head")``) at each keep ratio;
    * ``global_recall@r``: the same with one budget per sample across layers and heads;
    * ``spearman``: mean per-head Spearman correlation (undefined heads skipped);
    * ``loss``: mean of ``loss`` over batches, when given.

    The data is checked as by ``fit_aligner`` (see the module docstring) before the first batch.
    """
    _check_aligner(aligner)
    check_int("batch_size", batch_size, minimum=1)
    keep_ratios = check_keep_ratios(keep_ratios)
    data = _as_data(aligner, proxy_scores, target_scores, batch_size, "proxy_scores")
    return _evaluate(aligner, data, keep_ratios, loss)


def _check_aligner(aligner) -> None:
    if not isinstance(aligner, Aligner):
        raise TypeError(f"aligner must be a proxykv.align.Aligner, got {type(aligner).__name__}")


@torch.no_grad()
def _evaluate(aligner: Aligner, data: Iterable[Batch], keep_ratios: tuple[float, ...],
              loss: MultiGranularityLoss | None) -> dict[str, float]:
    was_training = aligner.training
    aligner.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}

    def add(name: str, values: torch.Tensor) -> None:
        values = values[~values.isnan()]
        sums[name] = sums.get(name, 0.0) + float(values.sum())
        counts[name] = counts.get(name, 0) + values.numel()

    for proxy, target in data:
        pred = aligner(proxy)
        for scope, prefix in (("head", "recall"), ("global", "global_recall")):
            recalls = topk_recall(pred, target, keep_ratios, scope=scope, reduction="none")
            for ratio, values in recalls.items():
                add(f"{prefix}@{ratio:g}", values)
        add("spearman", per_head_spearman(pred, target).flatten())
        if loss is not None:
            add("loss", loss(pred, target).reshape(1))
    aligner.train(was_training)
    if not counts:
        raise ValueError("the evaluation data yielded no batch")
    return {name: sums[name] / counts[name] if counts[name] else math.nan for name in sums}


@torch.no_grad()
def _mean_loss(aligner: Aligner, data: _Data, loss: MultiGranularityLoss) -> float:
    was_training = aligner.training
    aligner.eval()
    values = [float(loss(aligner(proxy), target)) for proxy, target in data.batches(loss=loss)]
    aligner.train(was_training)
    if not values:
        raise ValueError("the held-out data yielded no batch (from an iterable, every "
                         "round(1/val_fraction)-th batch is held out); pass more batches, "
                         "val_data, or val_fraction=0")
    return sum(values) / len(values)


class _Progress:
    """A tqdm bar over the epochs on stderr, with the latest losses as its postfix; the final
    summary is written as a line of its own."""

    def __init__(self, enabled: bool, label: str, total: int):
        from tqdm.auto import tqdm

        self.label, self.enabled = label, enabled
        self.bar = tqdm(total=total, desc=label, disable=not enabled, file=sys.stderr,
                        mininterval=0.5, leave=False)

    def update(self, text: str, *, final: bool = False) -> None:
        if final:
            self.bar.close()
            if self.enabled:
                print(f"{self.label} {text}", file=sys.stderr, flush=True)
            return
        self.bar.update(1)
        self.bar.set_postfix_str(text, refresh=False)


def fit_aligner(aligner: Aligner, proxy_scores, target_scores=None, *,
                loss: MultiGranularityLoss | None = None, method: str = "auto",
                val_fraction: float = 0.2, val_data=None, epochs: int = 200,
                batch_size: int = 8, lr: float = 3e-2, weight_decay: float = 0.0,
                patience: int = 10, min_improvement: float = 1e-3,
                max_seconds: float | None = None, grad_clip: float | None = 1.0,
                ridge: float = 1e-3, keep_ratios=DEFAULT_KEEP_RATIOS, seed: int = 0,
                progress: bool = True) -> FitResult:
    """Fit ``aligner`` (in place) so its output on the proxy's scores ranks like the teacher's.

    Args:
        aligner: any registered aligner; parameter-free ones are only evaluated.
        proxy_scores, target_scores: training data (see the module docstring).
        loss: the objective of gradient fitting (default ``MultiGranularityLoss()``), also
            reported on held-out data.
        method: ``"auto"`` (closed form when the aligner supports it, else gradient),
            ``"gradient"`` (Adam) or ``"closed_form"`` (ridge regression; ``linear`` only).
        val_fraction: share of the samples (tensors, split with ``seed``) or of the batches (every
            ``round(1/val_fraction)``-th batch of an iterable) held out for early stopping and the
            returned metrics; 0 trains on everything and reports training metrics. A split
            that leaves either part empty raises ``ValueError`` saying how many samples or
            batches it needs, before any training step.
        val_data: explicit held-out data (a ``(proxy, target)`` pair of tensors or an iterable of
            pairs); overrides ``val_fraction``.
        epochs, batch_size, lr, weight_decay, grad_clip: the gradient fit (Adam, gradient-norm
            clipping; ``batch_size`` applies to tensor data).
        patience, min_improvement: stop after ``patience`` epochs whose held-out loss (training
            loss without held-out data) is not below ``best * (1 - min_improvement)``; the best
            epoch's weights are restored.
        max_seconds: stop after this much wall time (checked after every step).
        ridge: per-token L2 penalty of the closed-form fit (on standardised features).
        keep_ratios: keep ratios of the reported recall metrics.
        seed: shuffling and the held-out split.
        progress: a progress bar (tqdm) on stderr while fitting, and a summary line.

    Returns:
        ``FitResult``; ``result.metrics`` holds ``recall@0.1/0.3/0.5``, ``global_recall@…``,
        ``spearman`` and ``loss`` (see ``evaluate_aligner``).

    Raises:
        TypeError, ValueError: for bad arguments, and for bad data (NaN or ``+inf`` scores, empty
        data, mismatched shapes or ``-inf`` masks; see the module docstring), all before any
        training step.
    """
    _check_aligner(aligner)
    check_choice("method", method, FIT_METHODS)
    val_fraction = check_float("val_fraction", val_fraction, minimum=0.0, maximum=1.0,
                               meaning="the share of the data held out")
    if val_fraction == 1:
        raise ValueError("val_fraction must be < 1 (the share of the data held out), got 1.0")
    check_int("epochs", epochs, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    check_int("patience", patience, minimum=1)
    check_int("seed", seed)
    for name, value in (("lr", lr), ("ridge", ridge), ("weight_decay", weight_decay),
                        ("min_improvement", min_improvement)):
        check_float(name, value, minimum=0.0)
    if max_seconds is not None:
        check_float("max_seconds", max_seconds, minimum=0.0, exclusive_minimum=True)
    loss = MultiGranularityLoss() if loss is None else loss
    if not isinstance(loss, MultiGranularityLoss):
        raise TypeError(f"loss must be a proxykv.align.MultiGranularityLoss, got "
                        f"{type(loss).__name__}")
    keep_ratios = check_keep_ratios(keep_ratios)
    has_parameters = any(p.requires_grad for p in aligner.parameters())
    if method == "closed_form" and not aligner.supports_closed_form:
        raise ValueError(f"method='closed_form' needs an aligner with a closed-form fit (e.g. "
                         f"'linear'), got {aligner.name!r}; use method='gradient'")
    if method == "gradient" and not has_parameters:
        raise ValueError(f"the {aligner.name!r} aligner has no trainable parameters; "
                         f"method='gradient' has nothing to fit")
    chosen = ("closed_form" if aligner.supports_closed_form else "gradient") \
        if method == "auto" else method
    if not has_parameters:
        chosen = "none"

    train, held_out, evaluated_on = _split(aligner, proxy_scores, target_scores, val_fraction,
                                           val_data, batch_size, seed)
    report = _Progress(progress, f"[fit {aligner.name}]", epochs if chosen == "gradient" else 0)
    started = time.monotonic()
    result = FitResult(metrics={}, method=chosen, evaluated_on=evaluated_on)
    if chosen == "closed_form":
        statistics: dict[str, torch.Tensor] = {}
        for proxy, target in train:
            for name, value in aligner.closed_form_statistics(proxy, target).items():
                statistics[name] = statistics[name] + value if name in statistics else value
        if not statistics:
            raise ValueError("the training data yielded no batch")
        aligner.solve_closed_form(statistics, ridge)
    elif chosen == "gradient":
        _gradient_fit(aligner, train, held_out, loss, result, report, started, epochs=epochs,
                      lr=lr, weight_decay=weight_decay, patience=patience,
                      min_improvement=min_improvement, max_seconds=max_seconds,
                      grad_clip=grad_clip, seed=seed)
    result.metrics = _evaluate(aligner, held_out if held_out is not None else train, keep_ratios,
                               loss)
    result.seconds = time.monotonic() - started
    summary = "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()
                        if k.startswith("recall") or k in ("spearman", "loss"))
    report.update(f"done ({chosen}, {result.epochs} epochs, {result.seconds:.1f}s, "
                  f"{evaluated_on}): {summary}", final=True)
    aligner.eval()
    return result


def _gradient_fit(aligner: Aligner, train: _Data, held_out: _Data | None,
                  loss: MultiGranularityLoss, result: FitResult, report: _Progress,
                  started: float, *, epochs: int, lr: float, weight_decay: float, patience: int,
                  min_improvement: float, max_seconds: float | None, grad_clip: float | None,
                  seed: int) -> None:
    parameters = [p for p in aligner.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    best_loss, best_state, stale = math.inf, None, 0
    aligner.train()
    for epoch in range(1, epochs + 1):
        total, batches, out_of_time = 0.0, 0, False
        for proxy, target in train.batches(generator, loss):
            objective = loss(aligner(proxy), target)
            optimiser.zero_grad(set_to_none=True)
            objective.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
            optimiser.step()
            total, batches = total + float(objective.detach()), batches + 1
            result.steps += 1
            if max_seconds is not None and time.monotonic() - started > max_seconds:
                out_of_time = True
                break
        if batches == 0:
            raise ValueError("the training data yielded no batch")
        train_loss = total / batches
        val_loss = _mean_loss(aligner, held_out, loss) if held_out is not None else train_loss
        result.epochs = epoch
        result.history.append({"epoch": epoch, "step": result.steps, "train_loss": train_loss,
                               "val_loss": val_loss,
                               "seconds": time.monotonic() - started})
        if not math.isfinite(best_loss) or val_loss < best_loss * (1 - min_improvement):
            best_loss, stale, result.best_epoch = val_loss, 0, epoch
            best_state = {k: v.detach().clone() for k, v in aligner.state_dict().items()}
        else:
            stale += 1
        report.update(f"step {result.steps} train {train_loss:.4f} "
                      f"{'val' if held_out is not None else 'train'} {val_loss:.4f} "
                      f"best {best_loss:.4f} @ {result.best_epoch}")
        if stale >= patience or out_of_time:
            result.stopped_early = True
            break
    if best_state is not None:
        aligner.load_state_dict(best_state)
