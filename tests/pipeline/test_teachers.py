"""`distill teachers`: every number of teachers.json against a direct computation on tiny random
models (cross-entropy, perplexity, bits per byte, accuracy, agreement, lengths), chat rows in
each candidate's own template, a candidate of another tokenizer, a served candidate, errors."""

import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from distill.config import build_config
from distill.data.build import build_rows
from distill.data.tasks.tokenizer import chain_tokenizer
from distill.errors import ConfigError, DistillError
from distill.eval.answers import grade, normalize, splitter
from distill.eval.teacher_scores import agreement_matrix
from distill.models.loading import load_causal_lm
from distill.pipeline.teachers import TeacherSettings, run_teachers
from distill.report import write_report

from chat_server import ChatServer
from helpers import TINY_STUDENT

SETTINGS = TeacherSettings(rows=6, max_new_tokens=10, batch_size=4, agreement_words=3)
# Only characters of the built-in tokenizer: no '.', no newline.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }};{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
CHATS = [
    [("system", "be brief"), ("user", "what is two plus two"), ("assistant", "four")],
    [("user", "name a colour"), ("assistant", "blue"), ("user", "another one"), ("assistant", "red or green")],
    [("user", "say hi"), ("assistant", "hi there")],
]


def tiny_model(tok, seed: int):
    torch.manual_seed(seed)
    cfg = {**TINY_STUDENT, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
           "bos_token_id": tok.bos_token_id}  # fmt: skip
    return load_causal_lm(config=cfg)


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """Another tokenizer: byte-level BPE with merges, trained here on a few sentences."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["abc abd abe bcd cde def efg fgh ghi hij"] * 20 + ["be brief four blue red green hi there"] * 5
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", model_input_names=["input_ids", "attention_mask"])  # fmt: skip


def save(folder: Path, model, tok, template: str | None = None) -> str:
    if template is not None:
        tok.chat_template = template
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("candidates")
    char, bpe = chain_tokenizer(), bpe_tokenizer()
    return {
        "a": save(root / "a", tiny_model(char, 1), chain_tokenizer(), TEMPLATE),
        "b": save(root / "b", tiny_model(char, 2), chain_tokenizer(), TEMPLATE),
        "bpe": save(root / "bpe", tiny_model(bpe, 3), bpe, TEMPLATE),
        "plain": save(root / "plain", tiny_model(bpe, 3), bpe_tokenizer()),  # no chat template
    }


def config(tmp_path, **data):
    return build_config({"student": {"config": TINY_STUDENT, "tokenizer": "builtin"}, "data": data,
                         "objective": {"alpha": 0.0}, "eval": {"max_new_tokens": 4}, "out_dir": str(tmp_path / "run")})  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@torch.no_grad()
def direct(folder: str, contexts: list[list[int]], targets: list[list[int]], stops: set[int], max_new: int):
    """Row by row, no batching: summed target nats, target tokens, greedy ids up to a stop."""
    model = load_causal_lm(folder)
    nats, count, gens = 0.0, 0, []
    for ctx, tgt in zip(contexts, targets):
        ids = torch.tensor([ctx + tgt])
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)  # (T, V)
        nats -= sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(tgt))
        count += len(tgt)
        seq = list(ctx)
        for _ in range(max_new):  # plain greedy, whole sequence each step
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(nxt)
            if nxt in stops:
                break
        gens.append(seq[len(ctx) :])
    return nats, count, gens


def text_of(tok, ids: list[int], stops: set[int]) -> str:
    return tok.decode(ids[:-1] if ids and ids[-1] in stops else ids, skip_special_tokens=True).strip()


def test_chain_rows_every_number_against_direct_computation(folders, tmp_path):
    cfg = config(tmp_path, n_test=SETTINGS.rows, n_train=16)
    result = run_teachers(cfg, [folders["a"], folders["b"]], tmp_path / "out", SETTINGS, "cfg", progress=False)
    rows = build_rows(cfg.data.model_copy(update={"n_test": SETTINGS.rows}), "test")
    tok = chain_tokenizer()
    eos = tok.eos_token_id
    texts = []
    for record, name in zip(result["candidates"], ("a", "b")):
        ctx = [tok(r.prompt, add_special_tokens=False).input_ids for r in rows]
        tgt = [tok(r.completion, add_special_tokens=False).input_ids + [eos] for r in rows]
        nats, count, gens = direct(folders[name], ctx, tgt, {eos}, SETTINGS.max_new_tokens)
        answers = [text_of(tok, g, {eos}) for g in gens]
        texts.append(answers)
        assert record["scored_tokens"] == count
        assert record["heldout_ce"] == pytest.approx(nats / count, rel=1e-4)
        assert record["perplexity"] == pytest.approx(math.exp(nats / count), rel=1e-4)
        assert record["bits_per_byte"] == pytest.approx(nats / math.log(2) / sum(len(r.completion) for r in rows), rel=1e-4)
        assert record["accuracy"] == sum(grade(t, r.answer, "chain") for t, r in zip(answers, rows)) / len(rows)
        assert record["mean_tokens"] == pytest.approx(sum(map(len, gens)) / len(gens))
        assert record["mean_words"] == pytest.approx(sum(len(t.split()) for t in answers) / len(answers))
        assert record["samples"][0]["answer"] == answers[0] and record["samples"][0]["gold"] == rows[0].answer
        assert record["params"] > 0 and record["forward_tokens_per_s"] > 0 and record["generate_tokens_per_s"] > 0
        assert record["na"] == {}
    same = [splitter("chain")(x) is not None and splitter("chain")(y) is not None
            and normalize(splitter("chain")(x)[1]) == normalize(splitter("chain")(y)[1]) for x, y in zip(*texts)]  # fmt: skip
    agree = sum(same) / len(same)
    assert result["agreement"]["basis"] == "answer"
    assert result["agreement"]["matrix"] == [[1.0, agree], [agree, 1.0]]
    assert result["candidates"][0]["agreement"] == result["candidates"][1]["agreement"] == agree
    on_disk = json.loads((tmp_path / "out" / "teachers.json").read_text())
    assert on_disk["candidates"][0]["heldout_ce"] == result["candidates"][0]["heldout_ce"]


def test_chat_rows_score_the_last_assistant_turn_in_each_candidates_own_template(folders, tmp_path):
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": r, "content": c} for r, c in m]} for m in CHATS])
    cfg = config(tmp_path, source=source)
    result = run_teachers(cfg, [folders["a"], folders["bpe"]], tmp_path / "out", SETTINGS, "cfg", progress=False)
    assert result["data"]["kinds"] == ["chat"] and result["agreement"]["basis"] == "words"
    texts = []
    for record, name, tok in zip(result["candidates"], ("a", "bpe"), (chain_tokenizer(), bpe_tokenizer())):
        tok.chat_template = TEMPLATE
        ctx, tgt = [], []
        for m in CHATS:
            msgs = [{"role": r, "content": c} for r, c in m]
            context = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            assert context.endswith("assistant: ")
            ctx.append(tok(context, add_special_tokens=False).input_ids)
            tgt.append(tok(m[-1][1] + ";", add_special_tokens=False).input_ids)  # the turn and the template's end
        stops = {tok.eos_token_id, tok(";", add_special_tokens=False).input_ids[0]}
        nats, count, gens = direct(folders[name], ctx, tgt, stops, SETTINGS.max_new_tokens)
        assert record["template"] == "own" and record["scored_tokens"] == count
        assert record["heldout_ce"] == pytest.approx(nats / count, rel=1e-4)
        assert record["bits_per_byte"] == pytest.approx(nats / math.log(2) / sum(len(m[-1][1]) for m in CHATS), rel=1e-4)
        assert record["accuracy"] is None and "accuracy" in record["na"]
        texts.append([text_of(tok, g, stops) for g in gens])
        assert record["mean_tokens"] == pytest.approx(sum(map(len, gens)) / len(gens))
    # The BPE candidate reads fewer, longer tokens: its per-token CE is not comparable, bits/byte is.
    assert result["candidates"][1]["scored_tokens"] < result["candidates"][0]["scored_tokens"]
    words = [[t.lower().split()[:3] for t in ts] for ts in texts]
    agree = sum(x == y for x, y in zip(*words)) / len(CHATS)
    assert result["agreement"]["matrix"][0][1] == pytest.approx(agree)
    assert agreement_matrix(texts, [None] * len(CHATS), 3, "auto") == result["agreement"]["matrix"]


def test_agreement_compares_final_answers_on_rows_with_gold_and_first_words_elsewhere():
    a = ["so Answer: 7", "Hello there my friend", "x", "no answer here"]
    b = ["Answer: 7.", "hello there your friend", "y", "no answer here"]
    golds = ["7", None, None, "3"]  # row 4: neither finds an answer, which is no agreement
    assert agreement_matrix([a, b], golds, 2, "auto") == [[1.0, 0.5], [0.5, 1.0]]
    assert agreement_matrix([a, b], golds, 3, "auto")[0][1] == 0.25


def test_a_tokenizer_without_chat_template_reads_plain_role_lines(folders, tmp_path):
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": r, "content": c} for r, c in m]} for m in CHATS])
    record = run_teachers(config(tmp_path, source=source), [folders["plain"]], tmp_path / "out", SETTINGS, "cfg",
                          progress=False)["candidates"][0]  # fmt: skip
    tok = bpe_tokenizer()
    ctx = [tok("".join(f"{r}: {c}\n" for r, c in m[:-1]) + "assistant: ", add_special_tokens=False).input_ids for m in CHATS]
    tgt = [tok(m[-1][1] + "\n", add_special_tokens=False).input_ids for m in CHATS]
    nats, count, _ = direct(folders["plain"], ctx, tgt, {tok.eos_token_id}, 1)
    assert record["template"].startswith("plain role lines") and record["scored_tokens"] == count
    assert record["heldout_ce"] == pytest.approx(nats / count, rel=1e-4)
    assert all("\nuser:" not in s["answer"] for s in record["samples"])


def test_text_rows_score_every_token_after_the_first(folders, tmp_path):
    texts = ["abc abd abe bcd cde def", "ghi hij abc", "fgh ghi hij abc abd abe"]
    source = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    cfg = config(tmp_path, source=source, eval_source=source)
    result = run_teachers(cfg, [folders["bpe"]], tmp_path / "out", SETTINGS, "cfg", progress=False)
    tok = bpe_tokenizer()  # puts no BOS first: the first token is context, its bytes not counted
    ids = [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id] for t in texts]
    nats, count, _ = direct(folders["bpe"], [i[:1] for i in ids], [i[1:] for i in ids], {tok.eos_token_id}, 1)
    record = result["candidates"][0]
    assert record["scored_tokens"] == count
    assert record["target_bytes"] == sum(len(t) - len(tok.decode(i[:1])) for t, i in zip(texts, ids))
    assert record["bits_per_byte"] == pytest.approx(nats / math.log(2) / record["target_bytes"], rel=1e-4)
    assert record["agreement"] is None and record["na"]["agreement"] == "one candidate only"


def test_a_tokenizer_that_puts_a_bos_first_scores_every_text_token(tmp_path):
    tok = chain_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    assert tok("ab").input_ids[0] == tok.bos_token_id
    folder = save(tmp_path / "bos", tiny_model(chain_tokenizer(), 4), tok)
    texts = ["abc abd", "ghi hij abc"]
    source = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    cfg = config(tmp_path, source=source, eval_source=source)
    record = run_teachers(cfg, [folder], tmp_path / "out", SETTINGS, "cfg", progress=False)["candidates"][0]
    ids = [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id] for t in texts]
    nats, count, _ = direct(folder, [[tok.bos_token_id]] * 2, ids, {tok.eos_token_id}, 1)
    assert record["scored_tokens"] == count and record["target_bytes"] == sum(map(len, texts))
    assert record["bits_per_byte"] == pytest.approx(nats / math.log(2) / record["target_bytes"], rel=1e-4)


def test_a_served_candidate_answers_like_the_same_model_run_locally(folders, tmp_path):
    cfg = config(tmp_path, n_test=4, n_train=16)
    model, tok = load_causal_lm(folders["a"]), chain_tokenizer()
    settings = TeacherSettings(rows=4, max_new_tokens=10, batch_size=2, concurrency=2, timeout_s=30.0)
    with ChatServer(model, tok) as server:
        names = [folders["a"], f"{server.url}#tiny"]
        result = run_teachers(cfg, names, tmp_path / "out", settings, "cfg", progress=False)
    local, served = result["candidates"]
    assert served["kind"] == "served" and served["heldout_ce"] is None and served["params"] is None
    assert "log-probabilities" in served["na"]["heldout_ce"] and "params" in served["na"]
    assert served["accuracy"] == local["accuracy"] and served["mean_words"] == local["mean_words"]
    assert served["samples"] == local["samples"]  # greedy on both sides: the same answers
    # No answer found in either (a random model) is no agreement: the answer basis needs an answer.
    found = [splitter("chain")(s["answer"]) is not None for s in local["samples"]]
    assert result["agreement"]["matrix"][0][1] == result["agreement"]["matrix"][1][0] >= sum(found) / 4
    assert served["generate_tokens_per_s"] > 0 and served["refused"] == 0


def test_bad_rows_and_candidates_are_one_line_errors(folders, tmp_path):
    cfg = config(tmp_path, n_test=4, n_train=16)
    with pytest.raises(ConfigError, match="given twice"):
        run_teachers(cfg, [folders["a"], folders["a"]], tmp_path / "o", SETTINGS, "cfg", progress=False)
    with pytest.raises(ConfigError, match="URL#MODEL"):
        run_teachers(cfg, ["http://localhost:1/v1"], tmp_path / "o", SETTINGS, "cfg", progress=False)
    with pytest.raises(DistillError, match="model path not found"):
        run_teachers(cfg, [str(tmp_path / "nope")], tmp_path / "o", SETTINGS, "cfg", progress=False)
    bad = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
           {"messages": [{"role": "assistant", "content": "yo"}, {"role": "user", "content": "hi"}]}]  # fmt: skip
    source = write_jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(DistillError, match=r"bad\.jsonl:2: roles assistant, user do not fit"):
        run_teachers(config(tmp_path, source=source), [folders["a"]], tmp_path / "o", SETTINGS, "cfg", progress=False)
    strict = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}" + TEMPLATE
    folder = save(tmp_path / "strict", load_causal_lm(folders["a"]), chain_tokenizer(), strict)
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": r, "content": c} for r, c in m]} for m in CHATS])
    with pytest.raises(DistillError, match=r"strict: row 1: its chat template refuses the conversation \(no system role\)"):
        run_teachers(config(tmp_path, source=source), [folder], tmp_path / "o", SETTINGS, "cfg", progress=False)
    assert not (tmp_path / "o" / "teachers.json").exists()


def test_the_report_shows_the_teacher_choice_escaped(folders, tmp_path, open_page):
    cfg = config(tmp_path, n_test=4, n_train=16)
    result = run_teachers(cfg, [folders["a"], folders["b"]], tmp_path / "out", SETTINGS, "<b>cfg</b>", progress=False)
    page = write_report([tmp_path / "out"], tmp_path / "report.html").read_text()
    section = page[page.index('<section id="sec-teachers">') :]
    assert "&lt;b&gt;cfg&lt;/b&gt;" in section and "<b>cfg</b>" not in section
    for r in result["candidates"]:
        assert f'<td class="name">{r["name"]}</td>' in section
        assert f"{r['heldout_ce']:.4g}" in section
    assert "agreement on final answers" in section
    p = open_page(tmp_path / "report.html")  # a folder with teachers.json alone: no run, the page still draws
    assert p.errors == []
    assert "Teacher choice" in p.page.inner_text("#sec-teachers") and folders["b"] in p.page.inner_text("#teachers")


def test_the_command_reads_candidates_after_the_config_and_prints_the_table(folders, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from distill.cli import app

    tree = {"student": {"config": TINY_STUDENT, "tokenizer": "builtin"}, "data": {"n_test": 3, "n_train": 8},
            "objective": {"alpha": 0.0}, "out_dir": str(tmp_path / "run")}  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tree))
    runner = CliRunner()
    args = ["teachers", str(tmp_path / "run.yaml"), "--candidates", folders["a"], folders["b"], "data.n_test=2"]
    got = runner.invoke(app, [*args, "--max-new-tokens", "4"], env={"COLUMNS": "200"})
    assert got.exit_code == 0, got.output
    result = json.loads((tmp_path / "run" / "teachers.json").read_text())
    assert [c["name"] for c in result["candidates"]] == [folders["a"], folders["b"]] and result["data"]["rows"] == 2
    assert "bits/byte" in got.output and "agreement: on final answers (chain)" in got.output
    got = runner.invoke(app, ["teachers", str(tmp_path / "run.yaml")])
    assert isinstance(got.exception, ConfigError) and "give the candidates: --candidates A B C" in str(got.exception)


def test_a_run_folder_candidate_is_its_exported_student(folders, tmp_path):
    import shutil

    shutil.copytree(folders["a"], tmp_path / "run-a" / "student")
    cfg = config(tmp_path, n_test=3, n_train=8)
    settings = TeacherSettings(rows=3, max_new_tokens=4, batch_size=3)
    by_run, by_folder = run_teachers(cfg, [str(tmp_path / "run-a"), folders["a"]], tmp_path / "out", settings, "cfg",
                                     progress=False)["candidates"]  # fmt: skip
    assert by_run["name"] == str(tmp_path / "run-a") and by_run["heldout_ce"] == by_folder["heldout_ce"]
