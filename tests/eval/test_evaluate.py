"""Evaluation metrics: calibration, length drift, refusals, format, answer confidence, and the
teacher comparison of `distill eval` (a teacher identical to the student agrees everywhere)."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from distill.config import EvalConfig, build_config
from distill.data.build import build_rows
from distill.data.tasks import chain
from distill.data.tasks.tokenizer import chain_tokenizer
from distill.eval import metrics
from distill.eval.answers import grade, splitter
from distill.eval.evaluate import Generation, answer_confidence, generate_greedy_ids, load_student
from distill.loss.token_losses import IGNORE_INDEX
from distill.models.build import build_model
from distill.pipeline.runner import run_eval
from distill.training.loop import train


def test_ece_by_hand():
    conf = [0.05, 0.1, 0.5, 0.55, 0.95, 1.0]
    correct = [False, True, True, False, True, True]
    out = metrics.ece_bins(conf, correct, 15)
    # bins: 0.05 -> 0, 0.1 -> 1, 0.5 -> 7, 0.55 -> 8, 0.95 and 1.0 -> 14 (1.0 joins the last bin)
    gaps = [abs(0 - 0.05), abs(1 - 0.1), abs(1 - 0.5), abs(0 - 0.55)]  # one prediction each
    expected = sum(gaps) / 6 + 2 / 6 * abs(1 - (0.95 + 1.0) / 2)
    assert out["ece"] == pytest.approx(expected, abs=1e-12)
    bins = out["bins"]
    assert len(bins) == 15 and [b["count"] for b in bins] == [1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 2]
    assert bins[14]["confidence"] == pytest.approx(0.975) and bins[14]["accuracy"] == 1.0
    assert bins[2] == {"lo": 2 / 15, "hi": 3 / 15, "count": 0, "confidence": None, "accuracy": None}
    assert bins[0]["lo"] == 0.0 and bins[14]["hi"] == 1.0
    assert metrics.ece_bins([], [], 15)["ece"] is None
    with pytest.raises(ValueError, match="2 confidences for 1 grades"):
        metrics.ece_bins([0.1, 0.2], [True])


def test_length_ratios_by_hand():
    student, teacher = [2, 4, 6, 8, 10], [5, 5, 5, 5, 10]
    out = metrics.length_stats(student, teacher)
    # p90: position 0.9 * (5 - 1) = 3.6 in the sorted lengths, interpolated
    s_p90, t_p90 = 8 + 0.6 * (10 - 8), 5 + 0.6 * (10 - 5)
    assert out["student_p90"] == pytest.approx(s_p90) and out["teacher_p90"] == pytest.approx(t_p90)
    assert out["student_mean"] == 6.0 and out["teacher_mean"] == 6.0
    assert out["mean_ratio"] == 1.0 and out["p90_ratio"] == pytest.approx(s_p90 / t_p90)
    assert metrics.quantile([7], 0.9) == 7
    assert metrics.length_stats([1], [0])["p90_ratio"] is None


def test_refusal_rate_on_fixed_strings():
    texts = ["I can't help with that.", "Sure: 42", "i'm sorry, no", "As an AI model I decline", "I can’t do it"]
    assert metrics.refusal_rate(texts, EvalConfig().refusal_patterns) == 4 / 5
    assert metrics.refusal_rate(texts, [r"^sure"]) == 1 / 5
    assert metrics.refusal_rate(texts, []) == 0.0
    assert metrics.refusal_rate([], EvalConfig().refusal_patterns) is None


def test_format_adherence_regex_and_json_schema():
    texts = ["7+3=0#0", "7+3=0#", "7+3=0#0 extra", "5#5"]
    assert metrics.format_adherence(texts, chain.FORMAT_REGEX) == 2 / 4
    schema = {"type": "object", "required": ["answer"], "properties": {"answer": {"type": "integer"}}}
    replies = ['{"answer": 3}', '{"answer": "3"}', "not json", ' {"answer": 4} ']
    assert metrics.format_adherence(replies, schema=schema) == 2 / 4
    assert metrics.format_adherence(replies, regex=r"\{.*\}", schema=schema) == 1 / 4  # both checks
    assert metrics.format_adherence(replies) is None


def test_token_span_maps_characters_to_tokens():
    # tokens "7+", "3=0", "#", "3", <eos>: text "7+3=0#3", EOS decodes to nothing
    ends = [2, 5, 6, 7, 7]
    assert metrics.token_span(ends, 6, 7) == (3, 4)  # the answer "3"
    assert metrics.token_span(ends, 1, 3) == (0, 2)  # "+3" straddles two tokens
    assert metrics.token_span(ends, 0, 7) == (0, 4)


def _gen(tok, text: str, logprobs: list[float], eos: bool = True) -> Generation:
    ids = tok(text, add_special_tokens=False).input_ids + ([tok.eos_token_id] if eos else [])
    return Generation(text, ids, logprobs[: len(ids)], 0)


def test_answer_confidence_rule():
    tok = chain_tokenizer()
    lp = [-0.1 * (k + 1) for k in range(16)]
    chain_split = splitter("chain")
    # the built-in task: the one token after the last '#'
    assert answer_confidence(_gen(tok, "1+2=3#3", lp), tok, chain_split) == pytest.approx(math.exp(lp[6]))
    # a multi-token answer: every token of it, where the splitter found it
    text = "so 42 #### 42"  # the answer's last occurrence: characters (and tokens) 11 and 12
    assert answer_confidence(_gen(tok, text, lp), tok, splitter("gsm8k")) == pytest.approx(math.exp(lp[11] + lp[12]))
    # the answer where the splitter found it, not a later repeat of it
    text = "answer is 7 (3+4=7)"  # the answer is character 10; another 7 at 17
    assert answer_confidence(_gen(tok, text, lp), tok, splitter("answer_line")) == pytest.approx(math.exp(lp[10]))
    # no answer found: the whole generation but the final EOS
    assert answer_confidence(_gen(tok, "1+2", lp), tok, chain_split) == pytest.approx(math.exp(lp[0] + lp[1] + lp[2]))
    # truncated (no EOS) and no answer: every generated token
    assert answer_confidence(_gen(tok, "1+2", lp, eos=False), tok, chain_split) == pytest.approx(math.exp(sum(lp[:3])))
    # nothing but EOS: the EOS itself
    assert answer_confidence(_gen(tok, "", lp), tok, chain_split) == pytest.approx(math.exp(lp[0]))
    # the label task (split None): the whole output is the answer
    assert answer_confidence(_gen(tok, "34", lp), tok, None) == pytest.approx(math.exp(lp[0] + lp[1]))


def test_generation_logprobs_equal_teacher_forcing(tiny_tree):
    tok = chain_tokenizer()
    model = build_model(build_config(tiny_tree).student, tok, "student", 0)
    prompts = ["Q:1+2=", "Q:3*4-5+6=", "Q:7="]
    gens = generate_greedy_ids(model, tok, prompts, 6, 2)
    for prompt, g in zip(prompts, gens):
        p = tok(prompt, add_special_tokens=False).input_ids
        assert g.prompt_tokens == len(p) and 1 <= len(g.ids) <= 6
        assert (tok.eos_token_id in g.ids) == (g.ids[-1] == tok.eos_token_id)  # cut after the first EOS
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + g.ids])).logits[0]  # (T, V)
        logp = torch.log_softmax(logits.float(), -1)[len(p) - 1 : -1]  # (n, V) the positions that chose g.ids
        assert logp.argmax(-1).tolist() == g.ids  # greedy
        forced = logp.gather(1, torch.tensor(g.ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(g.logprobs), forced, atol=1e-5, rtol=0)


def test_forced_sums_by_hand():
    logits = torch.zeros(1, 3, 4)  # uniform student
    labels = torch.tensor([[IGNORE_INDEX, 2, 1]])
    teacher = torch.zeros(1, 3, 4)
    teacher[0, 1, 3] = math.log(3.0)  # position 1: teacher p = (1, 1, 1, 3) / 6
    out = metrics.forced_sums(logits, labels, teacher)
    assert out["count"] == 2.0
    assert out["student_ce"] == pytest.approx(2 * math.log(4))
    assert out["teacher_ce"] == pytest.approx(math.log(4) + math.log(6))  # target 1 at position 1: p = 1/6
    p = [1 / 6, 1 / 6, 1 / 6, 1 / 2]
    assert out["forward_kl"] == pytest.approx(sum(x * math.log(x / 0.25) for x in p))
    assert out["reverse_kl"] == pytest.approx(sum(0.25 * math.log(0.25 / x) for x in p))
    assert out["tvd"] == pytest.approx(0.5 * sum(abs(x - 0.25) for x in p))
    # argmax ties break to id 0 for both at position 0; at position 1 the teacher picks id 3
    assert out["agreement"] == 1.0


def _label_only_run(tiny_tree) -> Path:
    tree = copy.deepcopy(tiny_tree)
    tree["objective"]["alpha"] = 0.0
    del tree["teacher"]
    tree["train"]["steps"] = 2
    train(build_config(tree), show_progress=False)
    return Path(tree["out_dir"])


def test_teacher_identical_to_student_agrees_everywhere(tiny_tree, tmp_path):
    run = _label_only_run(tiny_tree)
    alone = run_eval(str(run))
    assert not {"agreement_top1", "divergences", "teacher", "length"} & set(alone)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["teacher"] = {"name": str(run / "student")}
    cfg_path = tmp_path / "with_teacher.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    result = run_eval(str(run), str(cfg_path))
    assert result == json.loads((run / "eval.json").read_text())
    assert result["agreement_top1"] == 1.0
    assert list(result["divergences"]) == list(metrics.EVAL_DIVERGENCES)  # the registry's eval entries
    for name in metrics.EVAL_DIVERGENCES:
        assert abs(result["divergences"][name]) < 1e-6, name
    assert result["teacher"]["accuracy"] == result["accuracy"]
    assert result["teacher"]["heldout_ce"] == pytest.approx(result["heldout_ce"], abs=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(result["heldout_ce"]))
    assert result["length"]["mean_ratio"] == 1.0 and result["length"]["p90_ratio"] == 1.0
    # the eval's other metrics, from its own greedy generations
    model, tok = load_student(run)
    prompts = [r.prompt for r in build_rows(build_config(cfg).data, "test")]
    gens = generate_greedy_ids(model, tok, prompts, cfg["eval"]["max_new_tokens"], 4)
    texts = [g.text for g in gens]
    assert result["length"]["student_mean"] == sum(len(g.ids) for g in gens) / len(gens)
    assert result["format_adherence"] == metrics.format_adherence(texts, chain.FORMAT_REGEX)
    assert result["refusal_rate"] == 0.0
    assert len(result["calibration"]["bins"]) == 15 and sum(b["count"] for b in result["calibration"]["bins"]) == len(gens)
    phases = json.loads((run / "budget.json").read_text())["phases"]
    assert phases["evaluation"]["records"] == 2 and phases["evaluation"]["tokens"] > 0  # two evaluations, added
    # ECE end to end: from each generation's answer confidence and its grade
    rows = build_rows(build_config(cfg).data, "test")
    confidences = [answer_confidence(g, tok, splitter("chain")) for g in gens]
    correct = [grade(g.text, r.answer, "chain") for g, r in zip(gens, rows)]
    assert result["calibration"]["ece"] == pytest.approx(metrics.ece_bins(confidences, correct)["ece"], abs=1e-9)


@pytest.mark.parametrize(
    "section, message",
    [
        ({"format_regex": "(#"}, r"'eval.format_regex': '\(#' is not a valid regular expression"),
        ({"refusal_patterns": ["ok", "[sorry"]}, r"'eval.refusal_patterns': '\[sorry' is not a valid regular expression"),
        ({"format_json_schema": {"type": "nope"}}, r"'eval.format_json_schema': not a valid JSON schema"),
        ({"calibration_bins": 0}, r"'eval.calibration_bins'"),
    ],
)
def test_bad_eval_settings_are_config_errors(tiny_tree, section, message):
    from distill.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        build_config({**tiny_tree, "eval": section})


def test_format_regex_defaults(tiny_tree, tmp_path):
    from distill.pipeline.runner import default_format_regex

    assert default_format_regex(build_config(tiny_tree)) == chain.FORMAT_REGEX
    label_task = {**tiny_tree, "rationale": {"mode": "multitask"}}
    assert default_format_regex(build_config(label_task)) == chain.ANSWER_REGEX  # the answer digit alone
    schema_only = {**tiny_tree, "eval": {"format_json_schema": {"type": "object"}}}
    assert default_format_regex(build_config(schema_only)) is None
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    own_data = {**tiny_tree, "data": {"source": str(data)}}
    assert default_format_regex(build_config(own_data)) is None  # not measured unless set
    own_data["eval"] = {"format_regex": "[ab]+"}
    assert default_format_regex(build_config(own_data)) == "[ab]+"
