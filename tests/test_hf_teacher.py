"""Teacher data (record_teacher_scores / TeacherData) and ``proxykv align-train``."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from proxykv.align import fit_aligner, get_aligner, load
from proxykv.cli import main
from proxykv.hf import get_scorer, teacher
from proxykv.hf.identity import model_fingerprint
from proxykv.hf.teacher import TeacherData, record_teacher_scores
from proxykv.hf.testing import tiny_model


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("qwen2", num_layers=3)
    proxy = tiny_model("qwen2", num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, seed=1)
    return target, proxy


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 100, (20 + i,), generator=g).tolist() for i in range(n)]


def test_records_the_scorers_outputs_and_resumes(pair, tmp_path):
    target, proxy = pair
    data_dir = tmp_path / "teacher"
    scorer = get_scorer("reconstruction", impl="torch")
    record_teacher_scores(target, proxy, prompts(2), data_dir, teacher_scorer=scorer,
                          progress=False)
    assert len(TeacherData(data_dir)) == 2
    first = (data_dir / "sample_000000.safetensors").stat().st_mtime_ns
    record_teacher_scores(target, proxy, prompts(4), data_dir, teacher_scorer=scorer,
                          progress=False)  # resumes
    assert (data_dir / "sample_000000.safetensors").stat().st_mtime_ns == first
    data = TeacherData(data_dir)
    assert len(data) == 4 and data.proxy_shape == (2, 1) and data.target_shape == (3, 2)
    for (proxy_scores, target_scores), ids in zip(data, prompts(4)):
        ids = torch.tensor([ids])
        expected_target = scorer.score(target, ids).scores.clamp_min(1e-30).log()
        expected_proxy = scorer.score(proxy, ids).scores.clamp_min(1e-30).log()
        assert proxy_scores.shape == (1, 2, 1, ids.shape[1])
        torch.testing.assert_close(target_scores, expected_target)
        torch.testing.assert_close(proxy_scores, expected_proxy)
    aligner = get_aligner("linear", data.proxy_shape, data.target_shape)
    result = fit_aligner(aligner, data, val_fraction=0.5, progress=False)
    assert 0.0 <= result.metrics["recall@0.3"] <= 1.0


def test_refuses_a_folder_of_other_models(pair, tmp_path):
    target, proxy = pair
    record_teacher_scores(target, proxy, prompts(1), tmp_path, progress=False)
    other = tiny_model("qwen2", num_layers=4)
    with pytest.raises(ValueError, match=r"the target's \(layers, KV heads\) differ \(\(3, 2\) "
                                         r"recorded vs \(4, 2\) given\)"):
        record_teacher_scores(other, proxy, prompts(1), tmp_path, progress=False)


def short_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of 16 random token ids."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 100, (16,), generator=g).tolist() for _ in range(n)]


def folder_state(folder) -> dict:
    """Every file's bytes: what a refused resume must leave untouched."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


FAST = get_scorer("reconstruction", impl="torch")  # the Triton interpreter is slow
FRESH = r"Use another --out/--data folder or delete .* to start fresh"


def record(target, proxy, prompts, folder, **options):
    """``record_teacher_scores`` without a progress bar, on the fast scorer."""
    return record_teacher_scores(target, proxy, prompts, folder, progress=False,
                                 teacher_scorer=FAST, **options)


def test_resumes_an_interrupted_run_with_identical_inputs(pair, tmp_path, monkeypatch):
    target, proxy = pair
    batch = short_prompts(4)
    calls = []
    real_save_file = teacher.save_file

    def interrupted(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stopped while writing the third sample
        real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(teacher, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        record(target, proxy, batch, tmp_path)
    monkeypatch.undo()
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["count"] == 2 and meta["requested"] == 4
    assert meta["target_fingerprint"] == model_fingerprint(target)
    assert meta["proxy_fingerprint"] == model_fingerprint(proxy)
    assert meta["prompt_hashes"] == [teacher.prompt_hash(ids) for ids in batch[:2]]
    before = folder_state(tmp_path)
    target.set_attn_implementation("eager")  # a runtime choice: still the same model
    try:
        record(target, proxy, batch, tmp_path)
    finally:
        target.set_attn_implementation("sdpa")
    data = TeacherData(tmp_path)
    assert len(data) == 4
    assert data.meta["prompt_hashes"] == [teacher.prompt_hash(ids) for ids in batch]
    after = folder_state(tmp_path)
    for name in ("sample_000000.safetensors", "sample_000001.safetensors"):
        assert after[name] == before[name], name
    # more prompts, the recorded ones first: resumed and extended
    record_teacher_scores(target, proxy, batch + short_prompts(1, seed=9), tmp_path,
                          progress=False, teacher_scorer=FAST)
    assert len(TeacherData(tmp_path)) == 5
    assert folder_state(tmp_path)["sample_000003.safetensors"] == after["sample_000003.safetensors"]


def test_refuses_other_prompts(pair, tmp_path):
    target, proxy = pair
    batch = short_prompts(3)
    record(target, proxy, batch, tmp_path)
    before = folder_state(tmp_path)
    for given, message in [
            (short_prompts(3, seed=1), r"the prompts differ from sample 0 on \(prompts\[0\]"),
            (batch[:2] + short_prompts(1, seed=1), r"the prompts differ from sample 2 on"),
            ([batch[1], batch[0], batch[2]], r"the prompts differ from sample 0 on"),
            (batch[:2], r"it holds 3 recorded samples but only 2 prompts are given")]:
        with pytest.raises(ValueError, match=f"{message}.*{FRESH}"):
            record(target, proxy, given, tmp_path)
        assert folder_state(tmp_path) == before  # refused before any scoring or writing


def test_refuses_another_pair_of_the_same_shapes(pair, tmp_path):
    target, proxy = pair
    record(target, proxy, short_prompts(1), tmp_path)
    before = folder_state(tmp_path)
    other_target = tiny_model("qwen2", num_layers=3, seed=7)
    other_proxy = tiny_model("qwen2", num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1,
                             seed=8)
    with pytest.raises(ValueError, match=rf"the target's weights differ \(fingerprint "
                                         rf"{model_fingerprint(target)[:12]}… recorded vs "
                                         rf"{model_fingerprint(other_target)[:12]}… given\)"):
        record(other_target, proxy, short_prompts(1), tmp_path)
    with pytest.raises(ValueError, match=r"the proxy's weights differ .*" + FRESH):
        record(target, other_proxy, short_prompts(1), tmp_path)
    with pytest.raises(ValueError, match=r"the proxy model differs \(hidden_size 32 vs 64"):
        record_teacher_scores(target, tiny_model("qwen2", num_layers=2, num_kv_heads=1),
                              short_prompts(1), tmp_path, progress=False, teacher_scorer=FAST)
    assert folder_state(tmp_path) == before


def test_refuses_another_max_length(pair, tmp_path):
    target, proxy = pair
    record_teacher_scores(target, proxy, short_prompts(2), tmp_path, max_length=12,
                          progress=False, teacher_scorer=FAST)
    with pytest.raises(ValueError, match=rf"the max_length differs \(12 recorded vs 8 given\).*"
                                         rf"{FRESH}"):
        record_teacher_scores(target, proxy, short_prompts(2), tmp_path, max_length=8,
                              progress=False, teacher_scorer=FAST)
    assert json.loads((tmp_path / "meta.json").read_text())["max_length"] == 12


def test_refuses_a_folder_of_the_previous_format(pair, tmp_path):
    target, proxy = pair
    record(target, proxy, short_prompts(1), tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    old = {key: meta[key] for key in ("proxy_shape", "target_shape", "teacher_scorer",
                                      "proxy_scorer", "max_length", "count")}
    (tmp_path / "meta.json").write_text(json.dumps(old))  # what the previous version wrote
    with pytest.raises(ValueError, match=rf"older format .* cannot be verified.*{FRESH}"):
        record(target, proxy, short_prompts(1), tmp_path)
    assert len(TeacherData(tmp_path)) == 1  # still readable as data


def test_text_prompts_need_a_tokenizer(pair, tmp_path):
    target, proxy = pair
    with pytest.raises(ValueError, match="tokenizer"):
        record(target, proxy, ["some text"], tmp_path)


def test_align_train_cli(pair, tmp_path, capsys):
    target, proxy = pair
    target.save_pretrained(tmp_path / "target")
    proxy.save_pretrained(tmp_path / "proxy")
    lines = [" ".join(map(str, p)) for p in prompts(5)]
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
    code = main(["align-train", "--target", str(tmp_path / "target"), "--proxy",
                 str(tmp_path / "proxy"), "--prompts", str(tmp_path / "prompts.txt"), "--out",
                 str(tmp_path / "aligner"), "--aligner", "linear", "--epochs", "2"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 5 and "recall@0.3" in report["metrics"]
    aligner = load(tmp_path / "aligner", proxy_shape=(2, 1), target_shape=(3, 2))
    assert aligner.name == "linear"
    # the pair it was trained on, for ProxyKV's check
    assert aligner.metadata["target_fingerprint"] == model_fingerprint(target)
    assert aligner.metadata["proxy_fingerprint"] == model_fingerprint(proxy)


def test_align_train_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["align-train", "--target", str(tmp_path), "--proxy", str(tmp_path), "--prompts",
              str(tmp_path / "none.txt"), "--out", str(tmp_path / "a")])
    assert exit_info.value.code == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("1 2 3\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["align-train", "--target", str(tmp_path), "--proxy", str(tmp_path), "--prompts",
              str(tmp_path / "p.txt"), "--out", str(tmp_path / "a")])
    assert exit_info.value.code == 2
    assert "not a model folder" in capsys.readouterr().err
