"""save -> load round trips exactly; the config records name, shapes and parameters; loading for
other shapes or with mismatched files raises."""

import json

import pytest
import torch
from safetensors.torch import save_file

from proxykv import align
from proxykv.align import get_aligner, io, load, read_config, save

NEG_INF = float("-inf")
CASES = [
    pytest.param("identity", (2, 2), (2, 2), {}, id="identity"),
    pytest.param("depth_interp", (3, 2), (5, 4), {}, id="depth_interp"),
    pytest.param("mean_broadcast", (3, 2), (5, 4), {}, id="mean_broadcast"),
    pytest.param("linear", (3, 2), (5, 4), {}, id="linear"),
    pytest.param("axial", (3, 2), (5, 4), {}, id="axial-defaults"),
    pytest.param("axial", (3, 2), (5, 4), {"conv_kernel": 3, "conv_filters": 1,
                                           "pool_sizes": [5], "profiles": 2, "hidden": 0},
                 id="axial-custom"),
]


def randomised(aligner):
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for parameter in aligner.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return aligner


@pytest.mark.parametrize("name, proxy_shape, target_shape, params", CASES)
def test_save_load_round_trips_exactly(name, proxy_shape, target_shape, params, tmp_path):
    aligner = randomised(get_aligner(name, proxy_shape, target_shape, **params))
    aligner.save(tmp_path / "aligner", metadata={"proxy": "tiny", "recall@0.3": 0.9})
    loaded = load(tmp_path / "aligner", proxy_shape=proxy_shape, target_shape=target_shape)
    assert type(loaded) is type(aligner) and loaded.config() == aligner.config()
    for key, value in aligner.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    scores = torch.randn(2, *proxy_shape, 40)
    scores[1, :, :, 30:] = NEG_INF
    assert torch.equal(loaded(scores), aligner(scores))


def test_config_records_name_shapes_params_and_metadata(tmp_path):
    aligner = get_aligner("axial", (24, 2), (28, 4), hidden=16)
    save(aligner, tmp_path, metadata={"proxy": "Qwen2.5-0.5B", "target": "Qwen2.5-7B"})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format"] == "proxykv-aligner" and config["format_version"] == 1
    assert config["aligner"] == "axial"
    assert config["proxy_shape"] == [24, 2] and config["target_shape"] == [28, 4]
    assert config["params"] == {"conv_kernel": 7, "conv_filters": 2, "pool_sizes": [9, 33],
                                "profiles": 3, "hidden": 16}
    assert config["metadata"] == {"proxy": "Qwen2.5-0.5B", "target": "Qwen2.5-7B"}
    assert read_config(tmp_path) == config
    assert (tmp_path / "weights.safetensors").is_file()


def test_load_for_other_shapes_raises(tmp_path):
    save(get_aligner("linear", (3, 2), (5, 4)), tmp_path)
    with pytest.raises(ValueError, match=r"the aligner saved at .* maps \(3, 2\) -> \(5, 4\) "
                                         r"\(layers, heads\), but target_shape=\(28, 4\) was "
                                         r"requested"):
        load(tmp_path, target_shape=(28, 4))
    with pytest.raises(ValueError, match=r"but proxy_shape=\(3, 1\) was requested"):
        load(tmp_path, proxy_shape=(3, 1))


def test_load_rejects_weights_that_do_not_fit_the_config(tmp_path):
    save(get_aligner("linear", (3, 2), (5, 4)), tmp_path)
    save_file({"weight": torch.zeros(20, 5), "bias": torch.zeros(20)},
              str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match=r"the weights at .*weights.safetensors do not fit the "
                                         r"saved 'linear' configuration"):
        load(tmp_path)


def test_load_rejects_missing_files_and_foreign_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no aligner config at .*config.json"):
        load(tmp_path / "nothing")
    (tmp_path / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match=r"is not a proxykv-aligner config of version 1, got "
                                         r"format='other'"):
        load(tmp_path)
    save(get_aligner("linear", (3, 2), (5, 4)), tmp_path)
    (tmp_path / "weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no aligner weights at"):
        load(tmp_path)


def test_load_unknown_aligner_names_the_available_ones(tmp_path):
    save(get_aligner("linear", (3, 2), (5, 4)), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["aligner"] = "gone"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unknown aligner 'gone'; available: 'axial'"):
        load(tmp_path)


def test_save_rejects_non_aligners_and_non_json_metadata(tmp_path):
    with pytest.raises(TypeError, match=r"aligner must be a proxykv.align.Aligner, got Linear"):
        save(torch.nn.Linear(2, 2), tmp_path)
    with pytest.raises(TypeError, match=r"must be JSON-serialisable"):
        save(get_aligner("linear", (1, 1), (1, 1)), tmp_path, metadata={"tensor": torch.zeros(1)})


def test_fit_save_load_keeps_the_fitted_metrics(tmp_path):
    proxy, target = align.synthetic_pair(6, (2, 2), (3, 2), 64, seed=1)
    aligner = get_aligner("linear", (2, 2), (3, 2))
    result = align.fit_aligner(aligner, proxy, target, val_fraction=0, progress=False)
    aligner.save(tmp_path, metadata={"metrics": result.metrics})
    loaded = load(tmp_path)
    assert align.evaluate_aligner(loaded, proxy, target, loss=align.MultiGranularityLoss()) \
        == result.metrics
    assert read_config(tmp_path)["metadata"]["metrics"] == result.metrics


def test_load_gives_back_the_saved_metadata(tmp_path):
    aligner = get_aligner("linear", (3, 2), (5, 4))
    assert aligner.metadata == {}
    pair = {"target_fingerprint": "ab" * 32, "proxy_fingerprint": "cd" * 32, "samples": 3}
    aligner.save(tmp_path / "with", metadata=pair)
    assert load(tmp_path / "with").metadata == pair
    save(aligner, tmp_path / "without")
    assert load(tmp_path / "without").metadata == {}


def saved_files(directory) -> dict:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.mark.parametrize("failing", ["weights", "config", "replace"])
def test_a_failed_save_leaves_the_previous_aligner_whole(failing, tmp_path, monkeypatch):
    previous = randomised(get_aligner("linear", (3, 2), (5, 4)))
    save(previous, tmp_path, metadata={"run": 1})
    before = saved_files(tmp_path)
    replacement = get_aligner("linear", (3, 2), (5, 4))  # zeros: other weights, same names

    def half_written(path, text):
        with open(path, "wb") as file:
            file.write(text[: len(text) // 2])  # the disk filled up mid-write
        raise OSError(28, "No space left on device")

    if failing == "weights":
        monkeypatch.setattr(io, "save_file", lambda tensors, path, metadata=None: half_written(
            path, b"\x00" * 4096))
    elif failing == "config":
        real_open = open

        def failing_open(path, mode="r", *args, **kwargs):
            if str(path).endswith(".tmp") and "config" in str(path) and "w" in mode:
                file = real_open(path, mode, *args, **kwargs)
                file.write('{"format": "proxykv-aligner", ')
                file.close()
                raise OSError(28, "No space left on device")
            return real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr("builtins.open", failing_open)
    else:
        def failing_replace(source, destination):
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(io.os, "replace", failing_replace)
    with pytest.raises(OSError):
        save(replacement, tmp_path, metadata={"run": 2})
    monkeypatch.undo()
    assert saved_files(tmp_path) == before  # no temporary file left either
    loaded = load(tmp_path)
    assert loaded.metadata == {"run": 1}
    for key, value in previous.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    save(replacement, tmp_path, metadata={"run": 2})  # and the next save goes through
    assert load(tmp_path).metadata == {"run": 2}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json",
                                                                "weights.safetensors"]
