"""The model zoo: seeded tasks, the tokenizer, the committed models and resumable training."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import itertools  # noqa: E402

from proxykv.zoo import MODELS, weights_path  # noqa: E402
from proxykv.zoo import tasks as T  # noqa: E402


def _resolve(context: list[int], variable: int) -> list[int]:
    """Follow assignments ``lhs rhs`` in ``context`` from ``variable`` until a value."""
    binding = {}
    for a, b in itertools.pairwise(context):
        if T.is_key(a) and (T.is_key(b) or T.is_value(b)):
            binding.setdefault(a, b)
    out = []
    while not out or T.is_key(out[-1]):
        out.append(binding[variable if not out else out[-1]])
    return out


@pytest.mark.parametrize("task", [*T.TASKS, "copy", "segment_copy"])
def test_tasks_deterministic_per_seed(task):
    a = T.make_sample(task, 123, length=200)
    b = T.make_sample(task, 123, length=200)
    c = T.make_sample(task, 124, length=200)
    assert (a.context, a.questions, a.answers) == (b.context, b.questions, b.answers)
    assert a.context != c.context
    assert a.text == b.text and isinstance(a.text, str)


@pytest.mark.parametrize("task", T.TASKS)
def test_eval_samples_structure(task):
    samples = T.eval_samples(task, 6, length=300)
    for s in samples:
        assert T.is_eval_seed(s.seed)
        assert len(s.context) == 300
        assert all(0 <= t < T.VOCAB_SIZE for t in s.context)
        assert len(s.questions) == T.EVAL_SETTINGS[task]["n_questions"]
        for q, a in zip(s.questions, s.answers):
            assert q[0] == T.QUERY and T.is_key(q[1])
            assert T.is_value(a[-1]) and all(T.is_key(t) for t in a[:-1])
            assert _resolve(s.context, q[1]) == a
            if task == "vartrack":
                assert len(a) >= 2  # at least 2 hops
            else:
                assert len(a) == 1
        # keys are never reused as different variables within one prompt
        keys_lhs = [x for x, y in zip(s.context, s.context[1:])
                    if T.is_key(x) and (T.is_key(y) or T.is_value(y))]
        assert len(keys_lhs) == len(set(keys_lhs))
    assert len({tuple(s.context) for s in samples}) == len(samples)


def test_vartrack_queries_one_chain_with_distractors():
    s = T.vartrack(T.eval_seed(0), length=400, n_chains=4, hops=(2, 3))
    assert len(s.questions) == 1
    values = [t for t in s.context if T.is_value(t)]
    assert len(values) == 4  # the other chains' values stay unqueried


def test_train_and_eval_seeds_disjoint():
    train = {T.train_seed(run, step, i) for run in range(3) for step in range(50) for i in range(8)}
    evals = {T.eval_seed(i, base) for base in range(3) for i in range(400)}
    assert max(train) < T.EVAL_SEED_BASE <= min(evals)
    assert not train & evals
    assert not any(T.is_eval_seed(s) for s in train)
    with pytest.raises(ValueError, match="evaluation seed"):
        T.training_sample(T.eval_seed(0), "retrieval", 64, 4)


def test_segment_copy_is_a_segment():
    s = T.segment_copy(T.eval_seed(3), 200)
    seg = [s.questions[0][1], *s.answers[0]]
    start = s.meta["start"]
    assert s.context[start:start + len(seg)] == seg and len(seg) == 50
    assert len(s.context) + len(s.questions[0]) + len(s.answers[0]) == 200


def test_training_sample_fits_length():
    for kind in ("copy", "segment_copy", "retrieval", "vartrack"):
        for length, pairs in ((64, 4), (256, 16)):
            ids, mask = T.training_sample(T.train_seed(0, 1), kind, length, pairs).training_ids()
            assert len(ids) == len(mask) and len(ids) <= length + 1 and sum(mask) > 0


def test_tokenizer_round_trip(tmp_path):
    from proxykv.hf.tokenizers import load_tokenizer
    from proxykv.zoo.tokenizer import build_tokenizer, save_tokenizer
    from proxykv.zoo.train import make_config

    tok = build_tokenizer()
    assert len(tok) == T.VOCAB_SIZE
    s = T.make_sample("vartrack", 7, length=120)
    ids = s.prompt_ids() + s.answers[0] + [T.SEP]
    text = T.render(ids)
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    assert tok.decode(ids) == text
    assert "k" in text and "<query>" in text
    save_tokenizer(tmp_path)
    make_config("proxy").save_pretrained(str(tmp_path))  # a model folder, as the zoo's
    loaded = load_tokenizer(tmp_path)
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded.decode(ids) == text
    assert loaded.pad_token_id == T.PAD and loaded.eos_token_id == T.SEP
    assert loaded("k1 nonsense", add_special_tokens=False)["input_ids"] == [
        T.KEY_IDS[1], T.UNK]


def _trained(name):
    return (weights_path(name) / "model.safetensors").exists()


@pytest.mark.parametrize("name", MODELS)
def test_committed_model_loads(name):
    from transformers import AutoModelForCausalLM

    from proxykv.zoo import load_tokenizer

    if not _trained(name):
        pytest.skip(f"zoo model {name} not trained yet")
    path = weights_path(name)
    model = AutoModelForCausalLM.from_pretrained(str(path))
    tok = load_tokenizer(name)
    assert model.config.vocab_size == T.VOCAB_SIZE == len(tok)
    sample = T.make_sample("multiquery", 3, length=100)
    assert tok(T.render(sample.context), add_special_tokens=False)["input_ids"] == sample.context
    assert sum(f.stat().st_size for f in path.iterdir()) < 8 * 2**20


def test_proxy_is_smaller_same_family():
    from transformers import AutoConfig

    if not (_trained("target") and _trained("proxy")):
        pytest.skip("zoo models not trained yet")
    t = AutoConfig.from_pretrained(str(weights_path("target")))
    p = AutoConfig.from_pretrained(str(weights_path("proxy")))
    assert t.model_type == p.model_type and t.vocab_size == p.vocab_size
    assert p.num_hidden_layers < t.num_hidden_layers
    assert p.hidden_size < t.hidden_size
    assert (p.num_attention_heads, p.num_key_value_heads) != (
        t.num_attention_heads, t.num_key_value_heads)


# bar on a small set of short prompts (the full bar, at 1k tokens, is in train_info.json)
BARS = {"target": 0.9, "proxy": 0.6}


@pytest.mark.parametrize("name", MODELS)
def test_committed_model_accuracy(name):
    from transformers import AutoModelForCausalLM

    from proxykv.zoo.accuracy import evaluate

    if not _trained(name):
        pytest.skip(f"zoo model {name} not trained yet")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model = AutoModelForCausalLM.from_pretrained(str(weights_path(name)))
    acc = evaluate(model, length=256, n=12, base_seed=7)
    assert min(acc.values()) >= BARS[name], acc
    info = json.loads((weights_path(name) / "train_info.json").read_text())
    assert info["accuracy"] and info["eval_length"] >= 1024
    if name == "target":
        assert min(info["accuracy"].values()) >= 0.95, info["accuracy"]


TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "intermediate_size": 64}


def test_tiny_training_decreases_loss_and_resumes(tmp_path):
    from transformers import AutoModelForCausalLM

    from proxykv.zoo.train import Stage, batch_loss, make_batch, train

    stages = [Stage(32, 2, 8, 8)]
    kw = {"model": "proxy", "seed": 3, "stages": stages, "save_every": 4, "eval_n": 0,
          "threads": 1, "config_overrides": TINY, "warmup": 1, "lr": 1e-2, "progress": False,
          "log": lambda m: None}
    ids, mask, is_copy = make_batch(3, 0, stages[0])  # the first training batch

    # interrupted after 4 steps, then resumed to the end
    logs = []
    part = train(tmp_path / "a", max_steps=4, **kw)
    assert part["steps"] == 4 and not (tmp_path / "a" / "model.safetensors").exists()
    assert (tmp_path / "a" / "checkpoints" / "ckpt_000004.pt").exists()
    done = train(tmp_path / "a", **{**kw, "log": logs.append})
    assert done["steps"] == 8 and any("resumed" in m and "step 4" in m for m in logs)
    resumed = AutoModelForCausalLM.from_pretrained(str(tmp_path / "a"))

    # uninterrupted reference run: same weights; and the loss went down from the start
    train(tmp_path / "b", **kw)
    straight = AutoModelForCausalLM.from_pretrained(str(tmp_path / "b"))
    for (n, p), (_, q) in zip(resumed.named_parameters(), straight.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)

    from transformers import Qwen2ForCausalLM

    from proxykv.zoo.train import make_config
    torch.manual_seed(3)
    fresh = Qwen2ForCausalLM(make_config("proxy", **TINY))
    with torch.no_grad():
        before = float(batch_loss(fresh, ids, mask, is_copy)[0])
        after = float(batch_loss(straight, ids, mask, is_copy)[0])
    assert after < before - 0.05, (before, after)


def test_grow_keeps_the_function():
    from transformers import Qwen2ForCausalLM

    from proxykv.zoo.train import grow, make_config

    torch.manual_seed(0)
    net = Qwen2ForCausalLM(make_config("target", **{**TINY, "num_hidden_layers": 2})).eval()
    x = torch.randint(0, T.VOCAB_SIZE, (2, 16))
    with torch.no_grad():
        before = net(input_ids=x).logits
        grow(net, 4)
        after = net(input_ids=x).logits
    assert len(net.model.layers) == net.config.num_hidden_layers == 4
    torch.testing.assert_close(after, before)


def test_grown_training_resumes(tmp_path):
    from transformers import AutoModelForCausalLM

    from proxykv.zoo.train import Stage, train

    stages = [Stage(32, 2, 4, 3, layers=1), Stage(32, 2, 4, 3)]
    kw = {"model": "target", "seed": 1, "stages": stages, "save_every": 2, "eval_n": 0,
          "threads": 1, "config_overrides": {**TINY, "num_hidden_layers": 2}, "progress": False,
          "log": lambda m: None}
    train(tmp_path, max_steps=4, **kw)  # checkpoint after growing
    logs = []
    train(tmp_path, **{**kw, "log": logs.append})
    assert any("resumed" in m for m in logs)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert model.config.num_hidden_layers == 2


@pytest.mark.parametrize("name", ["linear", "axial"])
def test_committed_aligners_fit_the_pair_and_record_their_training(name):
    from proxykv.align import load
    from proxykv.zoo import WEIGHTS_DIR

    aligner = load(WEIGHTS_DIR / f"aligner_{name}", proxy_shape=(2, 1), target_shape=(4, 2))
    config = json.loads((WEIGHTS_DIR / f"aligner_{name}" / "config.json").read_text())
    assert aligner.name == name
    assert config["metadata"]["command"].startswith("proxykv align-train")
    assert "--repeat-prompt" in config["metadata"]["command"]
    assert config["metadata"]["samples"] == 72 and config["metadata"]["held_out"] >= 10
    assert 0.0 < config["metadata"]["metrics"]["recall@0.3"] <= 1.0


def test_teacher_prompts_come_from_training_seeds():
    from proxykv.zoo.aligners import teacher_prompts

    prompts = teacher_prompts(2, 200)
    eval_contexts = {tuple(s.context) for task in T.TASKS for s in T.eval_samples(task, 8, 200)}
    assert len(prompts) == 2 * len(T.TASKS) and all(len(p) == 200 for p in prompts)
    assert not eval_contexts & {tuple(p) for p in prompts}


def test_zoo_train_command_trains_and_resumes(tmp_path, capsys):
    from proxykv.cli import main

    args = ["zoo", "train", "--out", str(tmp_path), "--models", "proxy", "--steps-scale",
            "0.002", "--eval-n", "0", "--threads", "1", "--no-aligners"]
    assert main(args) == 0
    assert (tmp_path / "proxy" / "model.safetensors").is_file()
    info = json.loads((tmp_path / "proxy" / "train_info.json").read_text())
    assert info["steps"] == 7 and info["model"] == "proxy"
    assert main(args) == 0  # a finished run resumes at its last checkpoint and stops
    assert "resumed" in capsys.readouterr().out
