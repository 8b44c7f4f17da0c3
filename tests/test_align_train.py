"""fit_aligner / evaluate_aligner: the synthetic acceptance test (axial > linear > mean_broadcast),
closed-form ridge, iterable data, early stopping, progress output and bad input."""

import numpy as np
import pytest
import torch

from proxykv.align import MultiGranularityLoss, evaluate_aligner, fit_aligner, get_aligner
from proxykv.align.synthetic import synthetic_pair

NEG_INF = float("-inf")
PROXY, TARGET = (3, 2), (4, 2)


@pytest.fixture(scope="module")
def data():
    """Training and held-out draws of one relation: channel mixing + a 3-tap blur."""
    train = synthetic_pair(24, PROXY, TARGET, 256, seed=1, padded_fraction=0.2)
    test = synthetic_pair(8, PROXY, TARGET, 256, seed=2, padded_fraction=0.2)
    return train, test


def test_axial_beats_linear_beats_mean_broadcast_on_held_out_data(data):
    (proxy, target), (test_proxy, test_target) = data
    recall = {}
    for name in ("mean_broadcast", "linear", "axial"):
        torch.manual_seed(0)
        aligner = get_aligner(name, PROXY, TARGET)
        # 30 epochs keep the test fast; the default (up to 200, early stopping) reaches ~0.95.
        fit_aligner(aligner, proxy, target, epochs=30, progress=False)
        recall[name] = evaluate_aligner(aligner, test_proxy, test_target)["recall@0.3"]
    assert recall["axial"] >= 0.9, recall
    assert recall["axial"] > recall["linear"] > recall["mean_broadcast"], recall


def naive_ridge(proxy, target, ridge):
    """Ridge regression of each sample's standardised teacher on its standardised proxy scores
    (plus an unpenalised bias) over tokens valid everywhere, in float64 numpy."""
    features, responses = [], []
    for x, y in zip(proxy.flatten(1, 2).double().numpy(), target.flatten(1, 2).double().numpy()):
        keep = np.isfinite(x).all(0) & np.isfinite(y).all(0)
        x_valid, y_valid = x[np.isfinite(x)], y[np.isfinite(y)]
        z = (x[:, keep] - x_valid.mean()) / x_valid.std()
        features.append(np.vstack([z, np.ones(keep.sum())]).T)
        responses.append(((y[:, keep] - y_valid.mean()) / y_valid.std()).T)
    features, responses = np.vstack(features), np.vstack(responses)
    penalty = np.full(features.shape[1], ridge * len(features))
    penalty[-1] = 0
    solution = np.linalg.solve(features.T @ features + np.diag(penalty), features.T @ responses)
    return solution[:-1].T, solution[-1]


@pytest.mark.parametrize("ridge", [0.0, 0.1])
def test_closed_form_linear_is_the_ridge_solution(ridge):
    proxy, target = synthetic_pair(6, PROXY, TARGET, 128, seed=3, padded_fraction=0.3)
    aligner = get_aligner("linear", PROXY, TARGET)
    result = fit_aligner(aligner, proxy, target, ridge=ridge, val_fraction=0, progress=False)
    assert result.method == "closed_form" and result.steps == 0
    weight, bias = naive_ridge(proxy, target, ridge)
    torch.testing.assert_close(aligner.weight, torch.from_numpy(weight).float(), atol=1e-5,
                               rtol=1e-4)
    torch.testing.assert_close(aligner.bias, torch.from_numpy(bias).float(), atol=1e-5, rtol=1e-4)


def test_closed_form_linear_recovers_a_pure_channel_mixing():
    proxy, target = synthetic_pair(6, PROXY, TARGET, 128, seed=3, blur=(1.0,))
    result = fit_aligner(get_aligner("linear", PROXY, TARGET), proxy, target, ridge=0.0,
                         progress=False)
    assert result.metrics["spearman"] > 0.999 and result.metrics["recall@0.3"] > 0.97


def test_closed_form_from_batches_equals_closed_form_from_tensors():
    proxy, target = synthetic_pair(8, PROXY, TARGET, 64, seed=4, padded_fraction=0.3)
    whole = get_aligner("linear", PROXY, TARGET)
    fit_aligner(whole, proxy, target, val_fraction=0, progress=False)
    batched = get_aligner("linear", PROXY, TARGET)
    batches = [(proxy[i:i + 3], target[i:i + 3]) for i in range(0, 8, 3)]
    result = fit_aligner(batched, batches, val_fraction=0, progress=False)
    assert result.evaluated_on == "train"
    torch.testing.assert_close(batched.weight, whole.weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.bias, whole.bias, atol=1e-5, rtol=1e-5)


def test_gradient_fit_from_an_iterable_holds_out_every_fifth_batch(data):
    (proxy, target), _ = data
    seen = []

    class Recording:
        def __iter__(self):
            for index in range(6):
                seen.append(index)
                yield proxy[4 * index:4 * index + 4], target[4 * index:4 * index + 4]

    torch.manual_seed(0)
    aligner = get_aligner("axial", PROXY, TARGET, hidden=0)
    result = fit_aligner(aligner, Recording(), epochs=2, progress=False)
    assert result.evaluated_on == "held_out" and result.method == "gradient"
    assert result.steps == 2 * 5  # batch 4 of 6 is held out
    assert 0 <= result.metrics["recall@0.3"] <= 1 and "loss" in result.metrics


def test_early_stopping_restores_the_best_epoch(data):
    (proxy, target), _ = data
    torch.manual_seed(0)
    aligner = get_aligner("axial", PROXY, TARGET)
    # Only halving the held-out loss counts as progress: epoch 1 stays the best, two stale epochs
    # end the fit, and the weights of epoch 1 come back.
    result = fit_aligner(aligner, proxy[:10], target[:10], min_improvement=0.5, patience=2,
                         progress=False)
    assert result.stopped_early and result.best_epoch == 1 and result.epochs == 3
    losses = [entry["val_loss"] for entry in result.history]
    assert losses[2] < losses[0]  # the last weights were better, but not by half
    assert result.metrics["loss"] == pytest.approx(losses[0], rel=1e-6)


def test_val_data_replaces_the_split(data):
    (proxy, target), (test_proxy, test_target) = data
    aligner = get_aligner("linear", PROXY, TARGET)
    result = fit_aligner(aligner, proxy, target, val_data=(test_proxy, test_target),
                         progress=False)
    assert result.evaluated_on == "val_data"
    assert result.metrics == evaluate_aligner(aligner, test_proxy, test_target,
                                              loss=MultiGranularityLoss())


@pytest.mark.parametrize("name", ["identity", "depth_interp", "mean_broadcast"])
def test_parameter_free_aligners_are_only_evaluated(name):
    proxy, target = synthetic_pair(4, (2, 2), (2, 2), 32, seed=5)
    result = fit_aligner(get_aligner(name, (2, 2), (2, 2)), proxy, target, progress=False)
    assert result.method == "none" and result.steps == 0 and result.epochs == 0
    assert set(result.metrics) >= {"recall@0.1", "recall@0.3", "recall@0.5", "spearman", "loss"}


def test_evaluate_identity_on_its_own_scores_is_perfect():
    proxy, _ = synthetic_pair(3, (2, 2), (2, 2), 50, seed=6, padded_fraction=0.5)
    metrics = evaluate_aligner(get_aligner("identity", (2, 2), (2, 2)), proxy, proxy)
    assert metrics["recall@0.1"] == metrics["global_recall@0.5"] == 1.0
    assert metrics["spearman"] == pytest.approx(1.0)


def test_progress_prints_a_status_line_unless_disabled(data, capsys):
    (proxy, target), _ = data
    fit_aligner(get_aligner("axial", PROXY, TARGET), proxy, target, epochs=1, progress=True)
    err = capsys.readouterr().err
    assert "[fit axial]" in err and "done (gradient, 1 epochs" in err and "recall@0.3" in err
    fit_aligner(get_aligner("axial", PROXY, TARGET), proxy, target, epochs=1, progress=False)
    assert capsys.readouterr().err == ""


def test_max_seconds_stops_the_fit(data):
    (proxy, target), _ = data
    result = fit_aligner(get_aligner("axial", PROXY, TARGET), proxy, target, epochs=10_000,
                         patience=10_000, max_seconds=0.5, progress=False)
    assert result.stopped_early and result.epochs < 10_000


def test_mismatched_invalid_positions_raise():
    proxy, target = synthetic_pair(2, PROXY, TARGET, 20, seed=7)
    target[1, 0, 1, 13] = NEG_INF
    with pytest.raises(ValueError, match=r"proxy_scores and target_scores must mark the same "
                                         r"positions invalid \(-inf in some channel\); they differ "
                                         r"at 1 position\(s\), the first at sample 1, token 13"):
        fit_aligner(get_aligner("linear", PROXY, TARGET), proxy, target, progress=False)


@pytest.mark.parametrize("kwargs, error, message", [
    pytest.param({"target_shape": (5, 2)}, ValueError,
                 r"target_scores must have shape \[N, Lt=5, Ht=2, T\] for the target model",
                 id="target-shape"),
    pytest.param({"method": "closed_form"}, ValueError,
                 r"method='closed_form' needs an aligner with a closed-form fit \(e.g. 'linear'\), "
                 r"got 'axial'", id="closed-form-axial"),
    pytest.param({"val_fraction": 1.0}, ValueError, r"val_fraction must be < 1",
                 id="val-fraction"),
    pytest.param({"epochs": 0}, ValueError, r"epochs must be >= 1, got 0", id="epochs"),
    pytest.param({"lr": -1.0}, ValueError, r"lr must be a finite float >= 0, got -1.0", id="lr"),
])
def test_bad_fit_arguments_raise(kwargs, error, message):
    proxy, target = synthetic_pair(4, PROXY, TARGET, 20, seed=8)
    target_shape = kwargs.pop("target_shape", TARGET)
    aligner = get_aligner("axial", PROXY, target_shape)
    with pytest.raises(error, match=message):
        fit_aligner(aligner, proxy, target, progress=False, **kwargs)


def test_bad_data_forms_raise():
    proxy, target = synthetic_pair(1, PROXY, TARGET, 20, seed=9)
    aligner = get_aligner("axial", PROXY, TARGET)
    with pytest.raises(ValueError, match=r"val_fraction=0.2 of 1 sample\(s\) leaves no held-out or "
                                         r"no training sample"):
        fit_aligner(aligner, proxy, target, progress=False)
    with pytest.raises(TypeError, match=r"proxy_scores must be re-iterable \(a list, a "
                                        r"DataLoader\), got a one-shot generator"):
        fit_aligner(aligner, ((proxy, target) for _ in range(5)), progress=False)
    with pytest.raises(ValueError, match=r"the 'depth_interp' aligner has no trainable parameters"):
        fit_aligner(get_aligner("depth_interp", PROXY, TARGET), proxy, target, method="gradient",
                    val_fraction=0, progress=False)
    with pytest.raises(TypeError, match=r"each batch must be a \(proxy_scores, target_scores\) "
                                        r"pair, got Tensor at batch 0"):
        fit_aligner(aligner, [proxy, proxy], val_fraction=0, progress=False)


def test_prepared_targets_reject_a_prediction_invalid_where_the_teacher_is_valid():
    loss = MultiGranularityLoss()
    target = torch.randn(1, 2, 2, 10)
    prepared = loss.prepare(target)
    pred = target.clone()
    torch.testing.assert_close(loss(pred, prepared), loss(pred, target))
    pred[0, 0, 0, 3] = NEG_INF
    with pytest.raises(ValueError, match=r"pred is -inf at a position where the prepared teacher "
                                         r"is valid"):
        loss(pred, prepared)
    with pytest.raises(ValueError, match=r"target was prepared by a MultiGranularityLoss with "
                                         r"other settings"):
        MultiGranularityLoss(block_size=4)(target, prepared)
