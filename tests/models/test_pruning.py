"""Students pruned from the teacher by measured importance: `distill student --prune`."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from distill.cli import student as student_command
from distill.config import build_config
from distill.data.tasks.tokenizer import chain_tokenizer
from distill.errors import DistillError
from distill.models.calibration import builtin_texts, calibration_batches
from distill.models.importance import Importance, measure_importance
from distill.models.loading import count_parameters, load_causal_lm, load_tokenizer
from distill.models.prune_targets import Dims, count_for, parse_params, teacher_dims
from distill.models.pruning import choose_heads, choose_kept, choose_layers, make_pruned_student, measure_teacher, prune_model
from distill.training.loop import train

from helpers import read_metrics

# 4 layers, 8 query heads in 2 key-value groups of 4, head size 8: room for every cut.
SHAPE = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8,
         "intermediate_size": 96, "max_position_embeddings": 128}  # fmt: skip
FAMILIES = {
    "llama": {"model_type": "llama", "tie_word_embeddings": True},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": False},  # q/k/v biases
    "gemma3_text": {"model_type": "gemma3_text", "sliding_window": 4, "sliding_window_pattern": 2, "query_pre_attn_scalar": 8},
}
SMALL = {"layers": 3, "hidden_size": 48, "intermediate_size": 40, "heads": 4, "kv_heads": 1}


def _random_model(family: str, tok):
    torch.manual_seed(0)
    model = load_causal_lm(config={**SHAPE, **FAMILIES[family], "vocab_size": len(tok), "pad_token_id": tok.pad_token_id})
    with torch.no_grad():  # non-trivial norms and biases (init makes them 1 or 0), so cutting them shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """A saved random teacher per family, with the built-in tokenizer."""
    root, tok = tmp_path_factory.mktemp("teachers"), chain_tokenizer()
    folders = {}
    for family in FAMILIES:
        folders[family] = root / family
        _random_model(family, tok).save_pretrained(folders[family])
        tok.save_pretrained(folders[family])
    return folders


def _batches(n=6, batch_rows=4, order=None):
    texts = builtin_texts(n)
    texts = texts if order is None else [texts[i] for i in order]
    return calibration_batches(texts, chain_tokenizer(), max_tokens=64, batch_rows=batch_rows)


def _ids(n=2, t=10):
    return torch.randint(4, 70, (n, t), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _masked_teacher_logits(teacher, kept, ids):
    """The teacher with the dropped layers skipped and dropped heads and neurons zeroed."""
    hd, handles = teacher.config.head_dim, []
    for i, layer in enumerate(teacher.model.layers):
        if i not in kept.layers:
            handles.append(layer.register_forward_hook(lambda m, a, k, o: a[0] if a else k["hidden_states"], with_kwargs=True))
            continue
        j = kept.layers.index(i)
        heads = torch.zeros(teacher.config.num_attention_heads)
        heads[kept.heads[j]] = 1
        neurons = torch.zeros(teacher.config.intermediate_size)
        neurons[kept.neurons[j]] = 1
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, h=heads: (a[0] * h.repeat_interleave(hd),)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, n=neurons: (a[0] * n,)))
    try:
        return _logits(teacher, ids)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_everything_is_the_teacher(teachers, tmp_path, family):
    full = {"layers": 4, "hidden_size": 64, "intermediate_size": 96, "heads": 8, "kv_heads": 2}
    record = make_pruned_student(str(teachers[family]), tmp_path / "s", **full, calibration_rows=4)
    assert record["dims"] == full and record["kept_layers"] == [0, 1, 2, 3]
    teacher, student = load_causal_lm(str(teachers[family])), AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert torch.equal(_logits(student, _ids()), _logits(teacher, _ids()))
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == (family != "qwen2")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("heads, kv_heads", [(4, 1), (4, 2), (2, 2)])  # whole groups / inside groups / both
def test_pruned_student_is_the_teacher_with_the_rest_skipped_or_zeroed(teachers, family, heads, kv_heads):
    teacher = load_causal_lm(str(teachers[family]))
    dims = Dims(layers=3, hidden_size=64, intermediate_size=40, heads=heads, kv_heads=kv_heads)
    kept = choose_kept(measure_importance(teacher, _batches()), teacher_dims(teacher.config), dims)
    student, factor = prune_model(teacher, kept, dims)
    assert factor is None and len(kept.layers) == 3
    if family != "llama":  # per-layer attention kinds follow the kept layers
        assert student.config.layer_types == [teacher.config.layer_types[i] for i in kept.layers]
    ids = _ids()
    torch.testing.assert_close(_logits(student, ids), _masked_teacher_logits(teacher, kept, ids), atol=1e-5, rtol=1e-5)


def test_head_choice_keeps_whole_groups_of_equal_size():
    scores = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.5, 0.5, 0.6, 0.1])  # 2 groups of 4 query heads
    assert choose_heads(scores, 2, kv=1, per_group=4) == ([4, 5, 6, 7], [1])  # group sums 1.5 < 1.7
    assert choose_heads(scores, 2, kv=2, per_group=2) == ([1, 3, 4, 6], [0, 1])  # a tie goes to the lower head
    # a group is scored by the heads it would keep: best pairs 1.2 vs 1.1, though its whole sum is lower
    assert choose_heads(scores, 2, kv=1, per_group=2) == ([1, 3], [0])


def rows(heads: list[int]) -> list[int]:
    """The weight rows of whole heads of size 8."""
    return [h * 8 + d for h in heads for d in range(8)]


def test_pruned_heads_follow_their_key_value_groups(teachers, tmp_path):
    record = make_pruned_student(str(teachers["qwen2"]), tmp_path / "s", heads=2, kv_heads=1, calibration_rows=4)
    teacher, student = load_causal_lm(str(teachers["qwen2"])), AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert (student.config.num_attention_heads, student.config.num_key_value_heads, student.config.head_dim) == (2, 1, 8)
    kept = json.loads((tmp_path / "s" / "student.json").read_text())["kept"]
    for j, (q_heads, groups) in enumerate(zip(kept["heads"], kept["kv_heads"])):
        assert len(groups) == 1 and [h // 4 for h in q_heads] == groups * 2  # both query heads read the kept group
        t_attn, s_attn = teacher.model.layers[record["kept_layers"][j]].self_attn, student.model.layers[j].self_attn
        assert torch.equal(s_attn.k_proj.bias, t_attn.k_proj.bias[rows(groups)])
        assert torch.equal(s_attn.v_proj.weight, t_attn.v_proj.weight[rows(groups)])
        assert torch.equal(s_attn.q_proj.weight, t_attn.q_proj.weight[rows(q_heads)])
        assert torch.equal(s_attn.o_proj.weight, t_attn.o_proj.weight[:, rows(q_heads)])


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_student_generates_the_same_with_and_without_kv_cache(teachers, tmp_path, family):
    make_pruned_student(str(teachers[family]), tmp_path / "s", **SMALL, calibration_rows=4)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = student.generate(_ids(2, 5), use_cache=True, **kwargs)
        assert torch.equal(cached, student.generate(_ids(2, 5), use_cache=False, **kwargs))


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_ranking_does_not_depend_on_calibration_order_or_batching(teachers, family):
    teacher = load_causal_lm(str(teachers[family]))
    a = measure_importance(teacher, _batches(6, 4))
    b = measure_importance(teacher, _batches(6, 5, order=[4, 1, 5, 0, 3, 2]))
    assert a.tokens == b.tokens and a.predicted == b.predicted
    for name in ("skip_loss", "block_influence", "heads", "neurons", "hidden", "hidden_final"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-9)
        assert torch.equal(getattr(a, name).argsort(dim=-1), getattr(b, name).argsort(dim=-1)), name
    dims = Dims(**SMALL)
    assert choose_kept(a, teacher_dims(teacher.config), dims) == choose_kept(b, teacher_dims(teacher.config), dims)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_skip_loss_is_the_calibration_loss_without_that_layer(teachers, family):
    teacher, batches = load_causal_lm(str(teachers[family])), _batches()
    imp = measure_importance(teacher, batches)

    def mean_loss():  # transformers' own loss: a mean over each batch's labelled tokens
        sums = []
        for b in batches:
            labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
            n = int((labels[:, 1:] != -100).sum())
            with torch.no_grad():
                sums.append((teacher(**b, labels=labels).loss.item() * n, n))
        return sum(s for s, _ in sums) / sum(n for _, n in sums)

    assert imp.loss == pytest.approx(mean_loss(), rel=1e-5)
    for i, layer in enumerate(teacher.model.layers):
        handle = layer.register_forward_hook(lambda m, a, k, o: a[0] if a else k["hidden_states"], with_kwargs=True)
        try:
            assert imp.skip_loss[i].item() == pytest.approx(mean_loss(), rel=1e-5), i
        finally:
            handle.remove()


def test_layers_are_kept_by_skip_loss_with_block_influence_breaking_ties():
    imp = Importance(tokens=1, predicted=1, loss=2.0, skip_loss=torch.tensor([2.5, 2.0, 3.0, 2.0, 2.1], dtype=torch.float64),
                     block_influence=torch.tensor([0.1, 0.3, 0.2, 0.2, 0.9]), heads=None, neurons=None, hidden=None,
                     hidden_final=None)  # fmt: skip
    assert choose_layers(imp, 2) == [0, 2]
    assert choose_layers(imp, 3) == [0, 2, 4]  # 4 raises the loss a little, 1 and 3 not at all
    # the tie between 1 and 3 goes to the larger block influence
    assert choose_layers(imp, 4) == [0, 1, 2, 4]


def test_planted_dead_parts_score_zero_and_are_cut_first():
    tok = chain_tokenizer()
    teacher = _random_model("llama", tok)
    with torch.no_grad():
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()  # layer 2 adds nothing: an identity
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
        teacher.model.layers[0].self_attn.v_proj.weight[8:].zero_()  # layer 0: group 1 (heads 4..7) outputs 0
        teacher.model.layers[1].mlp.up_proj.weight[:10].zero_()  # layer 1: neurons 0..9 output 0
        for name, p in teacher.named_parameters():
            if name.endswith("norm.weight"):
                p[:8] = 0  # channels 0..7 read as 0 after every norm
    imp = measure_importance(teacher, _batches())
    assert imp.skip_increase[2] == 0 and imp.block_influence[2] < 1e-6
    assert (imp.heads[0, 4:] == 0).all() and (imp.heads[0, :4] > 0).all()
    assert (imp.neurons[1, :10] == 0).all() and (imp.neurons[1, 10:] > 0).all()
    assert (imp.hidden_scores([0, 1, 2, 3])[:8] == 0).all()
    kept = choose_kept(imp, teacher_dims(teacher.config), Dims(4, 56, 86, 4, 1))
    assert kept.kv_heads[0] == [0] and kept.heads[0] == [0, 1, 2, 3]
    assert kept.neurons[1] == list(range(10, 96)) and kept.hidden == list(range(8, 64))


def test_student_json_records_scores_and_kept_indices(teachers, tmp_path):
    record = make_pruned_student(str(teachers["llama"]), tmp_path / "s", **SMALL, calibration_rows=5)
    saved = json.loads((tmp_path / "s" / "student.json").read_text())
    assert saved["init"] == "pruned" and saved["params"] == record["params"] == count_parameters(
        AutoModelForCausalLM.from_pretrained(tmp_path / "s"))  # fmt: skip
    assert saved["calibration"] == {"source": "builtin:pydoc_topics", "rows": 5, "tokens": record["calibration"]["tokens"]}
    scores, kept = saved["importance"], saved["kept"]
    assert len(scores["skip_loss"]) == len(scores["block_influence"]) == 4
    assert [len(scores["heads"]), len(scores["heads"][0]), len(scores["neurons"][0]), len(scores["hidden"])] == [4, 8, 96, 64]
    assert kept["layers"] == saved["kept_layers"]
    ranked = sorted(range(4), key=lambda i: (-scores["skip_loss_increase"][i], -scores["block_influence"][i]))
    assert kept["layers"] == sorted(ranked[:3])
    assert len(kept["hidden"]) == 48 and kept["hidden"] == sorted(kept["hidden"])
    dropped = set(range(64)) - set(kept["hidden"])
    assert min(scores["hidden"][c] for c in kept["hidden"]) >= max(scores["hidden"][c] for c in dropped)
    for j, layer in enumerate(kept["layers"]):
        assert len(kept["heads"][j]) == 4 and len(kept["kv_heads"][j]) == 1 and len(kept["neurons"][j]) == 40
        neuron = scores["neurons"][layer]
        others = set(range(96)) - set(kept["neurons"][j])
        assert min(neuron[n] for n in kept["neurons"][j]) >= max(neuron[n] for n in others)


def test_scores_measured_once_prune_like_scores_measured_inside(teachers, tmp_path):
    teacher = str(teachers["llama"])
    make_pruned_student(teacher, tmp_path / "inside", **SMALL, calibration_rows=5)
    make_pruned_student(teacher, tmp_path / "given", **SMALL, calibration_rows=5, importance=measure_teacher(teacher, None, 5))
    assert (tmp_path / "inside" / "student.json").read_text() == (tmp_path / "given" / "student.json").read_text()
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("inside", "given"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_params_target_picks_the_largest_student_that_fits(teachers, tmp_path):
    assert [parse_params(x) for x in ("60M", "1.5B", "800k", "123")] == [60_000_000, 1_500_000_000, 800_000, 123]
    teacher = load_causal_lm(str(teachers["llama"]))
    target = int(0.6 * count_parameters(teacher))
    record = make_pruned_student(str(teachers["llama"]), tmp_path / "s", params=target, calibration_rows=4)
    dims = Dims(**record["dims"])
    assert (dims.layers, dims.heads, dims.kv_heads) == (4, 8, 2)  # depth and heads kept: width shrinks
    assert dims.hidden_size % 8 == 0 and record["params"] <= target and record["params_target"] == target
    assert record["params"] == count_for(teacher.config, dims)
    assert dims.intermediate_size == math.floor(96 * dims.hidden_size / 64 / 8) * 8  # the same factor, rounded down
    bigger = Dims(4, dims.hidden_size + 8, math.floor(96 * (dims.hidden_size + 8) / 64 / 8) * 8, 8, 2)
    assert count_for(teacher.config, bigger) > target


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_params_target_skips_hidden_sizes_the_config_refuses(teachers, tmp_path, family):
    """transformers' llama and gemma3 configs want the hidden size a multiple of the query
    heads: with 6 heads, 64 and 56 are refused, so the fit walks on to 48, which reloads."""
    teacher = load_causal_lm(str(teachers[family]))
    target = count_parameters(teacher) - 1
    record = make_pruned_student(str(teachers[family]), tmp_path / "s", params=target, heads=6, calibration_rows=4)
    dims = Dims(**record["dims"])
    assert (dims.heads, dims.hidden_size) == (6, 48) and record["params"] <= target
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert student.config.hidden_size == 48 and student.config.num_attention_heads == 6
    with pytest.raises(DistillError, match="refuses 6 smaller hidden sizes with 6 attention heads"):
        make_pruned_student(str(teachers[family]), tmp_path / "t", params="1k", heads=6, calibration_rows=4)
    assert not (tmp_path / "t").exists()


def test_gemma3_hidden_prune_keeps_the_residual_stream_and_the_head(teachers, tmp_path):
    record = make_pruned_student(str(teachers["gemma3_text"]), tmp_path / "s", hidden_size=48, calibration_rows=4)
    assert record["gemma3_embedding_rescale"] == pytest.approx(math.sqrt(64 / 48))
    teacher, student = load_causal_lm(str(teachers["gemma3_text"])), AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    hidden = json.loads((tmp_path / "s" / "student.json").read_text())["kept"]["hidden"]
    assert student.model.embed_tokens.embed_scale == pytest.approx(math.sqrt(48))  # the config's sqrt(hidden)
    with torch.no_grad():  # the embeddings write the teacher's values into the kept channels
        torch.testing.assert_close(student.model.embed_tokens(_ids()), teacher.model.embed_tokens(_ids())[..., hidden])
        # the logits' map from the final RMS-normalized state is unchanged: W (1 + w)
        torch.testing.assert_close(
            student.lm_head.weight * (1 + student.model.norm.weight),
            (teacher.lm_head.weight * (1 + teacher.model.norm.weight))[:, hidden],
        )


def _error(call) -> str:
    with pytest.raises(DistillError) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"heads": 9}, "--heads 9: the teacher has 8"),
        ({"kv_heads": 3}, "--kv-heads 3: the teacher has 2"),
        ({"hidden_size": 60}, "--hidden-size 60 is not a multiple of 8"),
        ({"heads": 6, "kv_heads": 4}, "--kv-heads 4: the teacher has 2"),
        ({"heads": 5}, "5 attention heads are not a multiple of 2 key-value heads"),
        ({"hidden_size": 40, "heads": 6}, "hidden size 40 with 6 attention heads: llama's config refuses it"),
        ({"heads": 8, "kv_heads": 1}, "8 heads over 1 key-value heads is 8 per group; the teacher's groups hold 4"),
        ({"layers": 5}, "--layers 5: the teacher has 4"),
        ({"intermediate_size": 0}, "--intermediate-size 0: the teacher has 96"),
        ({"params": "1k"}, "the smallest student of this shape has"),
        ({"params": "10M"}, "the teacher has"),
        ({"params": "lots"}, "give a count such as 60M"),
        ({"params": "50k", "hidden_size": 32, "intermediate_size": 32}, "--params chooses the hidden and MLP sizes"),
        ({}, "--prune needs a target"),
        ({"layers": 2, "calibration": "missing.jsonl"}, "not found: missing.jsonl"),
        ({"layers": 2, "calibration_rows": 0}, "--calibration-rows must be at least 1"),
    ],
)
def test_bad_targets_are_one_line_errors_and_write_nothing(teachers, tmp_path, options, message):
    out = tmp_path / "s"
    assert message in _error(lambda: make_pruned_student(str(teachers["llama"]), out, **options))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_an_unknown_family_is_refused_by_name(tmp_path):
    tok = chain_tokenizer()
    load_causal_lm(config={"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": len(tok)}).save_pretrained(
        tmp_path / "gpt2")  # fmt: skip
    tok.save_pretrained(tmp_path / "gpt2")
    message = _error(lambda: make_pruned_student(str(tmp_path / "gpt2"), tmp_path / "s", layers=1))
    assert message == "--prune supports llama, qwen2, gemma3_text models, not 'gpt2'"
    assert not (tmp_path / "s").exists()


def test_cli_options_that_do_not_go_with_prune(teachers, tmp_path):
    teacher, out = str(teachers["llama"]), str(tmp_path / "s")
    assert "give --layers N, not --every" in _error(lambda: student_command(teacher, out, every=2, prune=True))
    assert "go with --prune" in _error(lambda: student_command(teacher, out, layers=2, params="1M"))
    assert "go with --prune" in _error(lambda: student_command(teacher, out, layers=2, calibration_rows=4))
    assert not list(tmp_path.iterdir())


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "distill", "student", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)


def test_cli_prunes_with_a_calibration_file_and_says_why_it_fails(teachers, tmp_path):
    rows = tmp_path / "calibration.jsonl"
    rows.write_text('{"text": "x = 1 + 2"}\n{"prompt": "Q: 3 * 4 = ", "completion": "12"}\n{"text": "unused row"}\n')
    out = tmp_path / "s"
    options = ["--prune", "--layers", "2", "--intermediate-size", "48", "--calibration", str(rows), "--calibration-rows", "2"]
    proc = _cli("--from", str(teachers["gemma3_text"]), "--out", str(out), *options)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["calibration"]["rows"] == 2 and record["calibration"]["source"] == str(rows)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.num_hidden_layers, model.config.intermediate_size, len(model.config.layer_types)) == (2, 48, 2)
    assert (out / "tokenizer.json").exists() and not list(tmp_path.glob(".tmp-*"))

    proc = _cli("--from", str(teachers["gemma3_text"]), "--out", str(tmp_path / "t"), "--prune", "--heads", "3")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: 3 attention heads are not a multiple of 2 key-value heads"
    assert not (tmp_path / "t").exists()


def test_pruned_student_trains_with_distill_train(teachers, tmp_path):
    make_pruned_student(str(teachers["llama"]), tmp_path / "student", **SMALL, calibration_rows=4)
    tree = {
        "student": {"name": str(tmp_path / "student")},
        "teacher": {"name": str(teachers["llama"])},
        "data": {"n_train": 32, "n_test": 4},
        "objective": {"alpha": 0.5, "temperature": 2.0},
        "train": {"steps": 3, "micro_batch_size": 4, "lr": 1e-3, "warmup_steps": 1},
        "out_dir": str(tmp_path / "run"),
    }
    summary = train(build_config(tree), show_progress=False)
    metrics = read_metrics(tmp_path / "run")
    assert summary["steps"] == 3 and len(metrics) == 3
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["kd"]) for m in metrics)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    start = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert trained.config.hidden_size == 48
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, start.model.layers[0].mlp.up_proj.weight)


@pytest.mark.real
def test_prune_the_packaged_smollm2_then_train_a_step(tmp_path):
    rows = tmp_path / "calibration.jsonl"  # two short rows of CPython prose: a cheap measurement
    rows.write_text("".join(json.dumps({"text": text[:150]}) + "\n" for text in builtin_texts(2)))
    alias = "packaged:smollm2-135m-instruct"
    record = make_pruned_student(alias, tmp_path / "s", layers=10, intermediate_size=1024, calibration=str(rows))
    assert record["dims"] == {"layers": 10, "hidden_size": 576, "intermediate_size": 1024, "heads": 9, "kv_heads": 3}
    assert record["calibration"]["rows"] == 2 and {0, 29} <= set(record["kept_layers"])  # SmolLM2's ends matter most
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert count_parameters(student) == record["params"] < record["teacher_params"] / 2
    assert student.lm_head.weight is student.model.embed_tokens.weight

    tokenizer = load_tokenizer(str(tmp_path / "s"))
    ids = tokenizer(builtin_texts(3)[2][:200], return_tensors="pt")["input_ids"]
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    before = student.model.layers[0].mlp.up_proj.weight.detach().clone()
    loss = student(ids, labels=ids).loss
    assert math.log(len(tokenizer)) > loss.item()  # kept the teacher's knowledge: below a uniform guess
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, student.model.layers[0].mlp.up_proj.weight)


def test_params_target_when_the_config_refuses_every_hidden_size_is_one_line():
    from transformers import LlamaConfig

    from distill.models.prune_targets import fit_params

    config = LlamaConfig(hidden_size=48, num_attention_heads=8, num_key_value_heads=1, head_dim=8,
                         intermediate_size=96, num_hidden_layers=2, vocab_size=50)  # fmt: skip
    message = _error(lambda: fit_params(config, Dims(2, 48, 96, 7, 1), 20_000, False, False))
    assert message == "--params 20,000: llama's config refuses every hidden size with 7 attention heads"
