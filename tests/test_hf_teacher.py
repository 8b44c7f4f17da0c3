"""Teacher data (record_teacher_scores / TeacherData) and ``proxykv align-train``."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from proxykv.align import fit_aligner, get_aligner, load  # noqa: E402
from proxykv.cli import main  # noqa: E402
from proxykv.hf import get_scorer  # noqa: E402
from proxykv.hf.teacher import TeacherData, record_teacher_scores  # noqa: E402
from proxykv.hf.testing import tiny_model  # noqa: E402


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
    with pytest.raises(ValueError, match="other models or scorers"):
        record_teacher_scores(other, proxy, prompts(1), tmp_path, progress=False)


def test_text_prompts_need_a_tokenizer(pair, tmp_path):
    target, proxy = pair
    with pytest.raises(ValueError, match="tokenizer"):
        record_teacher_scores(target, proxy, ["some text"], tmp_path, progress=False)


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
