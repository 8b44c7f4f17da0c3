"""Bad input to the align package (docs/bad-input.md): NaN / +inf scores, empty dimensions, meta
tensors, score dtypes, corrupt saved aligners, unknown factory parameters."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from proxykv import align
from proxykv.align import (
    MultiGranularityLoss,
    block_rank_loss,
    budget_share_loss,
    evaluate_aligner,
    fit_aligner,
    get_aligner,
    load,
    per_head_spearman,
    read_config,
    regression_loss,
    save,
    token_rank_loss,
    topk_recall,
)
from proxykv.align.synthetic import synthetic_pair

NEG_INF = float("-inf")
ALL_ALIGNERS = ["identity", "depth_interp", "mean_broadcast", "linear", "axial"]
SHAPE = (2, 2)  # proxy and target, so that identity is usable too
PROXY, TARGET = (3, 2), (4, 2)
LOSSES = {
    "regression": regression_loss,
    "token_rank": token_rank_loss,
    "block_rank": lambda pred, target: block_rank_loss(pred, target, block_size=4),
    "budget_share": budget_share_loss,
    "combined": lambda pred, target: MultiGranularityLoss()(pred, target),
}
METRICS = {
    "recall": lambda pred, teacher: topk_recall(pred, teacher, reduction="none")[0.3],
    "global_recall": lambda pred, teacher: topk_recall(pred, teacher, scope="global",
                                                       reduction="none")[0.3],
    "spearman": per_head_spearman,
}


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def snapshot(aligner):
    return {key: value.clone() for key, value in aligner.state_dict().items()}


def assert_unchanged(aligner, before):
    after = aligner.state_dict()
    assert all(torch.equal(after[key], value) for key, value in before.items())


# ------------------------------------------------------------------ aligner forward


@pytest.mark.parametrize("name", ALL_ALIGNERS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "pos-inf"])
def test_aligner_rejects_nan_or_pos_inf_naming_the_first_position(name, bad):
    aligner = get_aligner(name, SHAPE, SHAPE)
    scores = randn(2, *SHAPE, 16)
    scores[0, 0, 0, 3] = NEG_INF          # a valid marker of an invalid position
    scores[1, 0, 1, 5] = bad
    scores[1, 1, 1, 9] = float("nan")
    with pytest.raises(ValueError, match=r"scores must hold finite values or -inf .*; found "
                                         rf"{bad} at position \[1, 0, 1, 5\] of shape "
                                         r"\(2, 2, 2, 16\)"):
        aligner(scores)


@pytest.mark.parametrize("name", ALL_ALIGNERS)
def test_aligner_reads_float64_as_float32(name):
    torch.manual_seed(0)
    aligner = get_aligner(name, SHAPE, SHAPE)
    scores = randn(2, *SHAPE, 16)
    scores[1, :, :, 12:] = NEG_INF
    out = aligner(scores.double())
    assert out.dtype == torch.float32
    assert torch.equal(out, aligner(scores))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_aligner_rejects_half_precision(dtype):
    aligner = get_aligner("linear", SHAPE, SHAPE)
    with pytest.raises(TypeError, match=rf"scores must be float32 or float64, got {dtype}"):
        aligner(torch.zeros(1, *SHAPE, 4, dtype=dtype))


@pytest.mark.parametrize("name", ALL_ALIGNERS)
def test_aligner_rejects_an_empty_batch(name):
    aligner = get_aligner(name, SHAPE, SHAPE)
    with pytest.raises(ValueError, match=r"scores must have B >= 1, got shape \(0, 2, 2, 8\)"):
        aligner(torch.zeros(0, *SHAPE, 8))


@pytest.mark.parametrize("name", ["identity", "mean_broadcast"])
def test_parameter_free_aligner_rejects_meta_scores(name):
    aligner = get_aligner(name, SHAPE, SHAPE)
    with pytest.raises(ValueError, match=r"scores must be on a CPU or CUDA device, got meta"):
        aligner(torch.zeros(1, *SHAPE, 8, device="meta"))


# ------------------------------------------------------------------ to_log_scores


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "pos-inf"])
def test_to_log_scores_rejects_nan_or_pos_inf_mass(bad):
    mass = torch.tensor([[0.5, NEG_INF, 0.0], [0.2, bad, 1.0]])
    with pytest.raises(ValueError, match=rf"scores must hold finite values or -inf .*; found {bad} "
                                         r"at position \[1, 1\] of shape \(2, 3\)"):
        align.to_log_scores(mass)


def test_to_log_scores_reads_float64_as_float32():
    mass = torch.tensor([0.5, 0.0, NEG_INF, 1e-3], dtype=torch.float64)
    logs = align.to_log_scores(mass)
    assert logs.dtype == torch.float32
    assert torch.equal(logs, align.to_log_scores(mass.float()))
    with pytest.raises(TypeError, match=r"scores must be float32 or float64, got torch.float16"):
        align.to_log_scores(mass.half())


def test_to_log_scores_rejects_meta_tensors():
    with pytest.raises(ValueError, match=r"scores must be on a CPU or CUDA device, got meta"):
        align.to_log_scores(torch.zeros(3, device="meta"))


# ------------------------------------------------------------------ fit / evaluate data


@pytest.mark.parametrize("name", ["linear", "axial"])
@pytest.mark.parametrize("side, bad", [("target", float("nan")), ("proxy", float("nan")),
                                       ("target", float("inf"))],
                         ids=["nan-teacher", "nan-proxy", "inf-teacher"])
def test_fit_rejects_nan_data_before_training(name, side, bad):
    proxy, target = synthetic_pair(6, PROXY, TARGET, 32, seed=1)
    tensor = target if side == "target" else proxy
    tensor[3, 1, 0, 7] = bad
    torch.manual_seed(0)
    aligner = get_aligner(name, PROXY, TARGET)
    before = snapshot(aligner)
    with pytest.raises(ValueError, match=rf"{side}_scores must hold finite values or -inf .*; "
                                         rf"found {bad} at position \[3, 1, 0, 7\]"):
        fit_aligner(aligner, proxy, target, val_fraction=0, epochs=2, progress=False)
    assert_unchanged(aligner, before)


@pytest.mark.parametrize("name", ["linear", "axial"])
def test_fit_checks_every_batch_of_an_iterable_before_training(name):
    proxy, target = synthetic_pair(12, PROXY, TARGET, 32, seed=2)
    target[10, 2, 1, 4] = float("nan")   # the last batch, position 1 within it
    batches = [(proxy[i:i + 3], target[i:i + 3]) for i in range(0, 12, 3)]
    torch.manual_seed(0)
    aligner = get_aligner(name, PROXY, TARGET)
    before = snapshot(aligner)
    with pytest.raises(ValueError, match=r"target_scores \(batch 3\) must hold finite values or "
                                         r"-inf .*; found nan at position \[1, 2, 1, 4\]"):
        fit_aligner(aligner, batches, val_fraction=0, epochs=2, progress=False)
    assert_unchanged(aligner, before)


def test_fit_reads_an_iterable_once_to_check_it_then_once_per_epoch():
    proxy, target = synthetic_pair(8, PROXY, TARGET, 32, seed=3)
    passes = []

    class Counting:
        def __iter__(self):
            passes.append(1)
            for index in range(4):
                yield proxy[2 * index:2 * index + 2], target[2 * index:2 * index + 2]

    fit_aligner(get_aligner("axial", PROXY, TARGET, hidden=0), Counting(), val_fraction=0,
                epochs=2, patience=5, progress=False)
    # The checking pass, two epochs, the final evaluation.
    assert len(passes) == 4


def test_val_data_and_evaluate_reject_nan():
    proxy, target = synthetic_pair(6, PROXY, TARGET, 32, seed=4)
    bad = target.clone()
    bad[2, 0, 0, 1] = float("nan")
    aligner = get_aligner("linear", PROXY, TARGET)
    with pytest.raises(ValueError, match=r"val_data: target_scores must hold finite values or -inf "
                                         r".*; found nan at position \[2, 0, 0, 1\]"):
        fit_aligner(aligner, proxy, target, val_data=(proxy, bad), progress=False)
    with pytest.raises(ValueError, match=r"val_data: target_scores \(batch 1\) must hold "
                                         r"finite values or -inf .*; found nan at position "
                                         r"\[0, 0, 0, 1\]"):
        fit_aligner(aligner, proxy, target, val_data=[(proxy[:2], bad[:2]), (proxy[2:], bad[2:])],
                    progress=False)
    with pytest.raises(ValueError, match=r"target_scores must hold finite values or -inf .*; "
                                         r"found nan at position \[2, 0, 0, 1\]"):
        evaluate_aligner(aligner, proxy, bad)


def test_fit_and_evaluate_reject_zero_samples():
    proxy, target = synthetic_pair(2, PROXY, TARGET, 16, seed=5)
    aligner = get_aligner("axial", PROXY, TARGET)
    message = r"proxy_scores must have N >= 1, got shape \(0, 3, 2, 16\)"
    with pytest.raises(ValueError, match=message):
        fit_aligner(aligner, proxy[:0], target[:0], progress=False)
    with pytest.raises(ValueError, match=message):
        evaluate_aligner(aligner, proxy[:0], target[:0])
    with pytest.raises(ValueError, match=r"proxy_scores yielded no batch"):
        fit_aligner(aligner, [], val_fraction=0, progress=False)
    with pytest.raises(ValueError, match=r"proxy_scores yielded no batch"):
        evaluate_aligner(aligner, [])


@pytest.mark.parametrize("samples, val_fraction, needed", [
    (2, 0.2, 3), (1, 0.5, 2),
    (4, 0.9, 5),  # round(0.9 * 5) = 4 (ties to even)
    (3, 0.1, 6),  # round(0.1 * 5) = 0
])
def test_too_few_samples_for_the_split_says_how_many_are_needed(samples, val_fraction, needed):
    proxy, target = synthetic_pair(samples, PROXY, TARGET, 16, seed=6)
    with pytest.raises(ValueError, match=rf"val_fraction={val_fraction} of {samples} sample\(s\) "
                                         rf"leaves no held-out or no training sample; it needs at "
                                         rf"least {needed} samples"):
        fit_aligner(get_aligner("linear", PROXY, TARGET), proxy, target,
                    val_fraction=val_fraction, progress=False)
    many, many_target = synthetic_pair(needed, PROXY, TARGET, 16, seed=6)
    fit_aligner(get_aligner("linear", PROXY, TARGET), many, many_target,
                val_fraction=val_fraction, progress=False)


def test_an_iterable_too_short_to_hold_a_batch_out_raises_before_training():
    proxy, target = synthetic_pair(4, PROXY, TARGET, 20, seed=7)
    torch.manual_seed(0)
    aligner = get_aligner("axial", PROXY, TARGET)
    before = snapshot(aligner)
    with pytest.raises(ValueError, match=r"val_fraction=0.2 holds out one batch in every 5, but "
                                         r"proxy_scores yielded 3 batch\(es\); it needs at least "
                                         r"5"):
        fit_aligner(aligner, [(proxy, target)] * 3, progress=False)
    assert_unchanged(aligner, before)


def test_fit_and_evaluate_read_float64_data_as_float32():
    proxy, target = synthetic_pair(6, PROXY, TARGET, 32, seed=8, padded_fraction=0.3)
    single = get_aligner("linear", PROXY, TARGET)
    fit_aligner(single, proxy, target, val_fraction=0, progress=False)
    double = get_aligner("linear", PROXY, TARGET)
    fit_aligner(double, proxy.double(), target.double(), val_fraction=0, progress=False)
    assert torch.equal(double.weight, single.weight) and torch.equal(double.bias, single.bias)
    assert evaluate_aligner(single, proxy.double(), target.double()) == \
        evaluate_aligner(single, proxy, target)
    with pytest.raises(TypeError, match=r"target_scores must be float32 or float64, got "
                                        r"torch.bfloat16"):
        evaluate_aligner(single, proxy, target.bfloat16())


def test_evaluate_rejects_bad_keep_ratios_and_non_aligners():
    proxy, target = synthetic_pair(2, PROXY, TARGET, 16, seed=9)
    aligner = get_aligner("linear", PROXY, TARGET)
    with pytest.raises(ValueError, match=r"each keep_ratios entry must be a finite float in "
                                         r"\(0, 1\]"):
        evaluate_aligner(aligner, proxy, target, keep_ratios=(0.3, 2.0))
    with pytest.raises(TypeError, match=r"aligner must be a proxykv.align.Aligner, got str"):
        evaluate_aligner("linear", proxy, target)


def test_fit_rejects_bad_keep_ratios_before_training():
    proxy, target = synthetic_pair(6, PROXY, TARGET, 16, seed=10)
    torch.manual_seed(0)
    aligner = get_aligner("axial", PROXY, TARGET)
    before = snapshot(aligner)
    with pytest.raises(ValueError, match=r"each keep_ratios entry must be a finite float in "
                                         r"\(0, 1\]"):
        fit_aligner(aligner, proxy, target, keep_ratios=(0.0,), epochs=1, progress=False)
    assert_unchanged(aligner, before)


# ------------------------------------------------------------------ losses and metrics


CALLS = {**{f"loss-{k}": v for k, v in LOSSES.items()},
         **{f"metric-{k}": v for k, v in METRICS.items()}}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_losses_and_metrics_read_float64_as_float32(call):
    function = CALLS[call]
    pred, target = randn(2, 2, 3, 12, seed=1), randn(2, 2, 3, 12, seed=2)
    pred[1, ..., 9:] = target[1, ..., 9:] = NEG_INF
    expected = function(pred, target)
    for got in (function(pred.double(), target), function(pred, target.double())):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_losses_and_metrics_reject_half_precision(call, dtype):
    scores = torch.zeros(1, 1, 2, 4)
    with pytest.raises(TypeError, match=rf"pred must be float32 or float64, got {dtype}"):
        CALLS[call](scores.to(dtype), scores)


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("shape, message", [
    ((0, 2, 2, 5), r"pred must have B >= 1, got shape \(0, 2, 2, 5\)"),
    ((1, 0, 2, 5), r"pred must have L >= 1, got shape \(1, 0, 2, 5\)"),
    ((1, 2, 0, 5), r"pred must have H >= 1, got shape \(1, 2, 0, 5\)"),
    ((1, 2, 2, 0), r"pred must have at least one position \(T >= 1\), got shape \(1, 2, 2, 0\)"),
], ids=["B", "L", "H", "T"])
def test_losses_and_metrics_reject_empty_dimensions(call, shape, message):
    with pytest.raises(ValueError, match=message):
        CALLS[call](torch.zeros(shape), torch.zeros(shape))


@pytest.mark.parametrize("call", sorted(CALLS))
def test_losses_and_metrics_reject_meta_tensors(call):
    scores = torch.zeros(1, 2, 2, 5, device="meta")
    with pytest.raises(ValueError, match=r"pred must be on a CPU or CUDA device, got meta"):
        CALLS[call](scores, scores)


def test_prepared_targets_follow_the_same_rules():
    loss = MultiGranularityLoss()
    target = randn(2, 2, 2, 10)
    pred = target + 0.5 * randn(2, 2, 2, 10, seed=3)
    prepared = loss.prepare(target.double())
    assert prepared.scores.dtype == torch.float32
    torch.testing.assert_close(loss(pred.double(), prepared), loss(pred, target), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"target must have B >= 1"):
        loss.prepare(target[:0])
    with pytest.raises(ValueError, match=r"target must be on a CPU or CUDA device, got meta"):
        loss.prepare(target.to("meta"))
    with pytest.raises(TypeError, match=r"target must be float32 or float64, got torch.float16"):
        loss.prepare(target.half())


# ------------------------------------------------------------------ saved aligners


@pytest.fixture
def saved(tmp_path):
    save(get_aligner("linear", (2, 2), (3, 2)), tmp_path)
    return tmp_path


@pytest.mark.parametrize("corrupt", ["truncated", "empty", "garbage"])
def test_corrupt_weights_name_the_file(saved, corrupt):
    path = saved / "weights.safetensors"
    content = path.read_bytes()
    path.write_bytes({"truncated": content[:len(content) // 2], "empty": b"",
                      "garbage": b"not a safetensors file at all"}[corrupt])
    message = rf"aligner weights {re.escape(str(path))} are not a readable safetensors file: "
    with pytest.raises(ValueError, match=message):
        load(saved)


@pytest.mark.parametrize("text, problem", [
    ('{"format": "proxykv-aligner", "format_', r"is not valid JSON"),
    ("", r"is not valid JSON"),
    (b"\xff\xfe\x00 binary", r"is not valid JSON"),
    ("[1, 2]", r"must hold a JSON object, got list"),
    ("null", r"must hold a JSON object, got NoneType"),
], ids=["truncated", "empty", "binary", "list", "null"])
def test_corrupt_config_names_the_file(saved, text, problem):
    path = saved / "config.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    for reader in (read_config, load):
        with pytest.raises(ValueError, match=rf"aligner config {re.escape(str(path))} {problem}"):
            reader(saved)


@pytest.mark.parametrize("field, value, problem", [
    ("proxy_shape", "ab", r"proxy_shape must be a pair of ints \(layers, heads\)"),
    ("target_shape", [3, 0], r"target_shape must have layers >= 1 and heads >= 1"),
    ("params", [1], r"params must be a JSON object, got list"),
    ("aligner", 3, r"aligner must be a string \(a registered name\), got int 3"),
    ("aligner", "gone", r"unknown aligner 'gone'"),
    ("params", {"hiden": 3}, r"got unexpected parameter\(s\) 'hiden'"),
], ids=["proxy-shape", "target-shape", "params-list", "aligner-int", "aligner-unknown",
        "params-unknown"])
def test_config_fields_that_do_not_describe_an_aligner_name_the_file(saved, field, value, problem):
    path = saved / "config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"aligner config {re.escape(str(path))}: .*{problem}"):
        load(saved)


@pytest.mark.parametrize("weights, problem", [
    ({"weight": torch.zeros(6, 4)}, r"missing 'bias'"),
    ({"weight": torch.zeros(6, 4), "bias": torch.zeros(6), "extra": torch.zeros(1)},
     r"unexpected 'extra'"),
    ({"weight": torch.zeros(6, 5), "bias": torch.zeros(6)},
     r"'weight' has shape \(6, 5\), expected \(6, 4\)"),
    ({"weight": torch.zeros(6, 4, dtype=torch.float64), "bias": torch.zeros(6)},
     r"'weight' is float64, expected float32"),
], ids=["missing", "extra", "shape", "dtype"])
def test_weights_that_do_not_fit_name_the_file(saved, weights, problem):
    path = saved / "weights.safetensors"
    save_file(weights, str(path))
    message = (rf"the weights at {re.escape(str(path))} do not fit the saved 'linear' "
               rf"configuration: .*{problem}")
    with pytest.raises(ValueError, match=message):
        load(saved)


def test_missing_files_stay_file_not_found(saved):
    (saved / "weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no aligner weights at "
                                                + re.escape(str(saved / "weights.safetensors"))):
        load(saved)
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no aligner config at "
                                                + re.escape(str(saved / "config.json"))):
        read_config(saved)


@pytest.mark.parametrize("proxy_shape, target_shape, message", [
    ((2, 3, 2, 8), (2, 4, 2, 8), None),                 # the aligner's shapes: accepted
    ((2, 2, 2, 8), (2, 4, 2, 8), "proxy_scores must have shape"),
    ((2, 3, 2, 8), (2, 4, 3, 8), "target_scores must have shape"),
    ((2, 3, 2, 8), (1, 4, 2, 8), "share B and T"),
    ((2, 3, 2, 8), (2, 4, 2, 9), "share B and T"),
    ((3, 2, 8), (2, 4, 2, 8), "proxy_scores"),
])
def test_closed_form_statistics_checks_its_inputs(proxy_shape, target_shape, message):
    aligner = get_aligner("linear", PROXY, TARGET)
    proxy, target = randn(*proxy_shape), randn(*target_shape, seed=1)
    if message is None:
        statistics = aligner.closed_form_statistics(proxy, target)
        assert float(statistics["count"]) == 2 * 8
        return
    with pytest.raises(ValueError, match=message):
        aligner.closed_form_statistics(proxy, target)
