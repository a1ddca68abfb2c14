"""Cross-tokenizer distillation: byte alignment of two real tokenizers (byte-level BPE and
SentencePiece with byte fallback), the bucket divergence, and training with a live
teacher, a cache and on-policy samples."""

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_tokenizers import byte_level_tokenizer, sentencepiece_tokenizer

from distill.config import build_config
from distill.data.alignment import align, prefix_shift, spans
from distill.data.token_bytes import VocabMap, text_of, token_bytes, utf8_prefix
from distill.errors import DistillError
from distill.loss.cross_tokenizer import bucket_divergence, teacher_in_student_space, uld
from distill.loss.divergences import DIVERGENCES, per_token
from distill.training.cross_teacher import Retokenizer
from distill.training.loop import train

from helpers import TINY_STUDENT, TINY_TEACHER, read_metrics

TEXTS = [
    "the cat sat on the mat",
    "numbers 12345 and 67890",
    "naïve café 😀 日本語 déjà vu",
    "  two leading spaces and a trailing one ",
    "emoji 🧪🧪 next to words",
]


@pytest.fixture(scope="module")
def toks():
    return byte_level_tokenizer(), sentencepiece_tokenizer(160)  # student, teacher: different merges


def _align_text(toks, text: str):
    s_tok, t_tok = toks
    s_ids = s_tok(text, add_special_tokens=False).input_ids
    t_ids = t_tok(text).input_ids
    s_tab, t_tab = token_bytes(s_tok), token_bytes(t_tok)
    data = text.encode()
    shift = prefix_shift(text_of(t_ids, t_tab), data, "teacher")
    return s_ids, t_ids, align(spans(s_ids, s_tab), spans(t_ids, t_tab, shift), len(data))


@pytest.mark.parametrize("text", TEXTS)
def test_tokens_are_their_bytes(toks, text):
    for tok in toks:
        ids = tok(text, add_special_tokens=False).input_ids
        assert text_of(ids, token_bytes(tok)) == text.encode()


def test_multibyte_characters_split_into_byte_tokens_still_align(toks):
    s_tok, t_tok = toks
    s_ids, t_ids, a = _align_text(toks, "a 😀 b")
    assert any(p.startswith("<0x") for p in t_tok.convert_ids_to_tokens(t_ids))  # the emoji is byte tokens
    s_tab, t_tab = token_bytes(s_tok), token_bytes(t_tok)
    for g in a.groups:  # each group holds the same bytes on both sides, even inside a character
        assert b"".join(s_tab[s_ids[i]] for i in g.student) == b"".join(t_tab[t_ids[i]] for i in g.teacher)
    covered = sorted(b for g in a.groups for b in range(g.start, g.end))
    assert covered == list(range(len("a 😀 b".encode())))


def test_bos_on_one_side_only_leaves_the_first_token_unpaired(toks):
    s_ids, t_ids, a = _align_text(toks, "the cat sat")
    assert toks[1].convert_ids_to_tokens(t_ids)[0] == "<bos>" and s_ids[0] != toks[0].bos_token_id
    # The student has no position before its first token; the teacher (BOS) does.
    assert all(s >= 0 and t >= 1 for s, t in a.pairs)
    first_group = a.groups[0]
    assert first_group.start == 0 and first_group.teacher[0] == 1  # token 1 after the BOS
    assert (first_group.student[0] - 1, first_group.teacher[0] - 1) not in a.pairs


def test_digits_split_differently_group_until_both_sides_end_together():
    # student "12" "345", teacher "1" "2" "3" "4" "5": groups [0, 2) and [2, 5)
    s = [(0, 2), (2, 5)]
    t = [(0, 0), (0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]  # a BOS first
    a = align(s, t, 5)
    assert [(g.start, g.end, g.student, g.teacher) for g in a.groups] == [(0, 2, (0,), (1, 2)), (2, 5, (1,), (3, 4, 5))]
    assert a.pairs == [(0, 2)]  # the boundary at byte 2: student position 0 and teacher position 2
    assert a.exact_student_tokens() == 0


def test_leading_space_conventions_are_the_same_bytes(toks):
    s_tok, t_tok = toks
    s_piece = s_tok.convert_ids_to_tokens(s_tok(" cat", add_special_tokens=False).input_ids)
    t_piece = t_tok.convert_ids_to_tokens(t_tok(" cat", add_special_tokens=False).input_ids)
    assert s_piece[0].startswith("Ġ") and t_piece[0].startswith("\u2581")
    vmap = VocabMap(t_tok, s_tok)
    t_id, s_id = t_tok.convert_tokens_to_ids("\u2581cat"), s_tok.convert_tokens_to_ids("Ġcat")
    assert vmap.t2s[t_id].item() == s_id


def test_a_dummy_prefix_space_is_taken_off_and_a_normalizer_is_refused():
    assert prefix_shift(b" hello", b"hello", "t") == 1
    with pytest.raises(DistillError, match="differ at byte 0"):
        prefix_shift(b"Hello", b"hello", "t")


def test_a_sample_cut_inside_a_character_aligns_up_to_it():
    assert utf8_prefix("ab😀".encode()[:-1]) == b"ab"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=30), st.lists(st.integers(1, 4), min_size=1, max_size=30),
       st.booleans(), st.booleans())  # fmt: skip
def test_groups_cover_every_byte_exactly_once_on_each_side(s_lens, t_lens, s_bos, t_bos):
    n = min(sum(s_lens), sum(t_lens))
    # Both sides tokenize the same n bytes: trim each to n, last token cut to fit.
    def cut(lens):
        out, at = [], 0
        for k in lens:
            if at >= n:
                break
            out.append((at, min(at + k, n)))
            at = min(at + k, n)
        return out

    s, t = cut(s_lens), cut(t_lens)
    s = ([(0, 0)] if s_bos else []) + s
    t = ([(0, 0)] if t_bos else []) + t
    a = align(s, t, n)
    for side, token_spans in ((0, s), (1, t)):
        bytes_seen = [b for g in a.groups for i in (g.student, g.teacher)[side] for b in range(*token_spans[i])]
        assert sorted(bytes_seen) == list(range(n))  # every byte once
        assert all(g.start <= token_spans[i][0] and token_spans[i][1] <= g.end for g in a.groups for i in (g.student, g.teacher)[side])
    starts = {g.start for g in a.groups}
    for ps, pt in a.pairs:  # a pair predicts tokens that start at the same common boundary
        assert s[ps + 1][0] == t[pt + 1][0] and s[ps + 1][0] in starts


@settings(max_examples=60, deadline=None)
@given(st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=40))
def test_real_tokenizers_cover_every_byte_of_random_text(toks, text):
    s_ids, t_ids, a = _align_text(toks, text)
    s_tab, t_tab = token_bytes(toks[0]), token_bytes(toks[1])
    got_s = b"".join(s_tab[s_ids[i]] for g in a.groups for i in g.student)
    got_t = b"".join(t_tab[t_ids[i]] for g in a.groups for i in g.teacher)
    assert got_s == got_t == text.encode()


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_one_tokenizer_on_both_sides_equals_the_ordinary_divergence(toks, name):
    s_tok = toks[0]
    vmap = VocabMap(s_tok, s_tok)
    assert bool(vmap.student_shared.all())
    torch.manual_seed(0)
    V = len(s_tok)
    s_logits = torch.randn(7, V, dtype=torch.float64) * 3
    t_logits = torch.randn(7, V, dtype=torch.float64) * 3
    lp = torch.log_softmax(t_logits / 2.0, -1)
    t_log, own, rest, _ = teacher_in_student_space(lp, vmap.t2s, V)
    got = bucket_divergence(name, s_logits, t_log.double(), own, rest.double(), 2.0)
    want = per_token(name, s_logits, t_logits, 2.0)
    torch.testing.assert_close(got.double(), want.double(), atol=1e-6, rtol=0)


def test_buckets_by_hand():
    # teacher ids 0..3 -> student ids 1, 1, -, 0 (two teacher ids share a string)
    t2s = torch.tensor([1, 1, -1, 0])
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    t_log, own, rest, unmatched = teacher_in_student_space(p.log(), t2s, 3, uld_k=2)
    assert own.tolist() == [[True, True, False]]
    torch.testing.assert_close(t_log[0, :2].exp(), torch.tensor([0.4, 0.3]))
    torch.testing.assert_close(rest.exp(), torch.tensor([0.3]))
    torch.testing.assert_close(unmatched.exp(), torch.tensor([[0.3, 0.0]]))
    q = torch.tensor([[0.5, 0.25, 0.25]])
    kl = bucket_divergence("forward_kl", q.log(), t_log, own, rest)
    want = 0.4 * torch.log(torch.tensor(0.4 / 0.5)) + 0.3 * torch.log(torch.tensor(0.3 / 0.25)) + 0.3 * torch.log(torch.tensor(0.3 / 0.25))
    torch.testing.assert_close(kl, want.reshape(1))
    torch.testing.assert_close(uld(q.log(), own, unmatched), torch.tensor([0.05 + 0.0]))


def test_a_cached_top_k_goes_to_the_bucket_where_unmapped():
    t2s = torch.tensor([1, -1, 0, 2])
    ids = torch.tensor([[0, 1]])
    lp = torch.tensor([[0.5, 0.3]]).log()
    t_log, own, rest, _ = teacher_in_student_space(lp, t2s, 3, ids, torch.tensor([0.2]).log())
    assert own.tolist() == [[False, True, False]]
    torch.testing.assert_close(t_log[0, 1].exp(), torch.tensor(0.5))
    torch.testing.assert_close(rest.exp(), torch.tensor([0.5]))


# --- training -------------------------------------------------------------------------------------

def _sentences(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "mat", "dog", "log", "12345", "67890", "naïve", "café", "😀", "fox", "river", "bank", "teacher", "student"]
    return [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 10)))} for _ in range(n)]


@pytest.fixture
def cross_tree(toks, tmp_path) -> dict:
    s_tok, t_tok = toks
    s_tok.save_pretrained(tmp_path / "s_tok")
    t_tok.save_pretrained(tmp_path / "t_tok")
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _sentences(48, 0)))
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in _sentences(8, 1)))
    return {
        "student": {"config": TINY_STUDENT, "tokenizer": str(tmp_path / "s_tok")},
        "teacher": {"config": TINY_TEACHER, "tokenizer": str(tmp_path / "t_tok")},
        "data": {"source": str(data), "eval_source": str(held), "max_length": 64},
        "objective": {"alpha": 0.5, "temperature": 2.0, "cross_tokenizer": "bucket"},
        "train": {"steps": 3, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 1},
        "eval": {"max_new_tokens": 8, "batch_size": 8},
        "out_dir": str(tmp_path / "run"),
    }


def test_a_mismatch_without_cross_tokenizer_names_the_setting(cross_tree):
    tree = copy.deepcopy(cross_tree)
    del tree["objective"]["cross_tokenizer"]
    with pytest.raises(DistillError, match="objective.cross_tokenizer"):
        train(build_config(tree), show_progress=False)


@pytest.mark.parametrize("mode", ["bucket", "uld"])
def test_a_teacher_of_another_tokenizer_trains(cross_tree, mode):
    cross_tree["objective"]["cross_tokenizer"] = mode
    train(build_config(cross_tree), show_progress=False)
    m = read_metrics(cross_tree["out_dir"])
    assert len(m) == 3 and all(torch.isfinite(torch.tensor(r["kd"])) and r["kd"] > 0 for r in m)
    assert 0.5 < m[0]["aligned"] <= 1.0  # the share of label tokens with a KD pair


def test_the_kd_term_is_the_bucket_divergence_at_the_pairs(cross_tree):
    """The first step's recorded KD equals a direct computation from both models' logits."""
    from distill.data.build import build_task_examples
    from distill.data.rows import collate, global_batch_indices
    from distill.models.build import build_models, build_teacher

    cfg = build_config(cross_tree)
    train(cfg, show_progress=False)
    first = read_metrics(cross_tree["out_dir"])[0]
    cfg2 = build_config(cross_tree)
    student, _, s_tok, vocab = build_models(cfg2)  # the run's initial weights
    teacher, t_tok, _ = build_teacher(cfg2, s_tok, student)
    examples = build_task_examples(cfg2, s_tok)[0]
    idx = global_batch_indices(0, len(examples), 8, cfg2.train.seed)
    batch = collate([examples[i] for i in idx], s_tok.pad_token_id)
    retok = Retokenizer(t_tok, s_tok)
    total, pairs, valid = 0.0, 0, int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for b in range(len(idx)):
            s_ids = batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist()
            t_ids = retok.teacher_ids(s_ids)
            t_logits = teacher(input_ids=torch.tensor([t_ids])).logits[0]
            for s, t in retok.pairs(s_ids, t_ids):
                if batch["labels"][b, s + 1] == -100:
                    continue
                lp = torch.log_softmax(t_logits[t : t + 1].double() / 2.0, -1)
                t_log, own, rest, _ = teacher_in_student_space(lp, retok.vmap.t2s, vocab)
                total += bucket_divergence("forward_kl", s_logits[b, s : s + 1, :vocab].double(), t_log.double(), own, rest.double(), 2.0).item()
                pairs += 1
    assert first["kd"] == pytest.approx(total / valid, rel=1e-4)
    assert first["aligned"] == pytest.approx(pairs / valid)


def test_on_policy_samples_are_retokenized_for_the_teacher(cross_tree):
    cross_tree["on_policy"] = {"lmbda": 1.0, "max_new_tokens": 6}
    rows = [{"prompt": r["text"][:12], "completion": r["text"][12:] or " end"} for r in _sentences(48, 2)]
    path = Path(cross_tree["out_dir"]).parent / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cross_tree["data"]["source"] = str(path)
    train(build_config(cross_tree), show_progress=False)
    m = read_metrics(cross_tree["out_dir"])
    assert all(r["aligned"] > 0 and torch.isfinite(torch.tensor(r["kd"])) for r in m)


def test_a_cross_tokenizer_cache_with_every_id_trains_like_the_live_teacher(cross_tree, tmp_path):
    from distill.pipeline.cache import write_teacher_cache

    cross_tree["train"]["steps"] = 2
    live = copy.deepcopy(cross_tree)
    train(build_config(live), show_progress=False)
    vocab = len(sentencepiece_tokenizer(160))
    manifest = write_teacher_cache(build_config(cross_tree), tmp_path / "cache", vocab, "float32", 16, 8, show_progress=False)
    assert manifest["cross_tokenizer"] and manifest["vocab_size"] == vocab
    cached = copy.deepcopy(cross_tree)
    cached["teacher_cache"], cached["out_dir"] = str(tmp_path / "cache"), str(tmp_path / "cached")
    train(build_config(cached), show_progress=False)
    for a, b in zip(read_metrics(live["out_dir"]), read_metrics(cached["out_dir"])):
        assert b["aligned"] == a["aligned"]
        assert b["kd"] == pytest.approx(a["kd"], abs=1e-5)
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)


def test_a_cache_of_the_other_kind_is_refused(cross_tree, tmp_path):
    from distill.pipeline.cache import write_teacher_cache

    write_teacher_cache(build_config(cross_tree), tmp_path / "cache", 8, "float16", 16, 8, show_progress=False)
    plain = copy.deepcopy(cross_tree)
    del plain["objective"]["cross_tokenizer"]
    plain["teacher"]["tokenizer"] = plain["student"]["tokenizer"]
    plain["teacher_cache"] = str(tmp_path / "cache")
    with pytest.raises(DistillError, match="cross-tokenizer cache"):
        train(build_config(plain), show_progress=False)


def test_the_kd_term_has_a_gradient(cross_tree):
    """The student's side of the KD term is differentiable (the teacher's is not)."""
    from distill.data.build import build_task_examples
    from distill.data.rows import collate
    from distill.training.setup import setup

    cross_tree["objective"]["alpha"] = 1.0
    run = setup(build_config(cross_tree), False)
    examples = build_task_examples(run.cfg, run.tokenizer)[0][:4]
    batch = run.teacher.attach(collate(examples, run.tokenizer.pad_token_id), [0, 1, 2, 3], examples)
    s_out = run.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss, terms = run.teacher.logit_terms(s_out, run.teacher.forward(batch), batch, (0.0, 1.0))
    loss.backward()
    grads = [p.grad for p in run.student.parameters() if p.grad is not None]
    assert terms["kd"].requires_grad and grads and any(g.abs().sum() > 0 for g in grads)


def test_eval_compares_with_the_teacher_where_the_texts_align(cross_tree):
    from distill.pipeline.runner import run_training

    result = run_training(build_config(cross_tree), show_progress=False)
    cross = result["eval"]["cross_teacher"]
    assert 0.5 < cross["coverage"] <= 1.0 and cross["pairs"] > 0
    assert cross["forward_kl"] > 0 and 0.0 <= cross["agreement_top1"] <= 1.0
    assert 0 < cross["student"]["bits_per_byte"] < 20 and 0 < cross["teacher"]["bits_per_byte"] < 20
    assert "agreement_top1" not in result["eval"].get("text", {})  # no comparison on the student's ids


def test_one_tokenizer_in_cross_mode_evaluates_like_the_ordinary_path(cross_tree):
    from distill.eval.evaluate import load_student
    from distill.pipeline.runner import evaluate_run

    cross_tree["teacher"]["tokenizer"] = cross_tree["student"]["tokenizer"]
    cfg = build_config(cross_tree)
    train(cfg, show_progress=False)
    model, tok = load_student(Path(cfg.out_dir) / "student")
    cross = evaluate_run(cfg, model, tok, None)["cross_teacher"]
    plain_tree = copy.deepcopy(cross_tree)
    del plain_tree["objective"]["cross_tokenizer"]
    plain_tree["data"]["packing"] = False
    plain = evaluate_run(build_config(plain_tree), model, tok, None)["text"]
    assert cross["coverage"] == pytest.approx(1.0)
    assert cross["forward_kl"] == pytest.approx(plain["divergences"]["forward_kl"], rel=1e-4)
    assert cross["agreement_top1"] == pytest.approx(plain["agreement_top1"], abs=1e-9)


# --- chat rows: each tokenizer renders its own template ---------------------------------------

STUDENT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEACHER_TEMPLATE = (  # Gemma's shape: a BOS, 'model' for the assistant, trimmed content
    "<bos>{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CHATS = [
    [{"role": "user", "content": "name a pet"}, {"role": "assistant", "content": "the cat sat on the mat"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "numbers?"},
     {"role": "assistant", "content": "12345 and 67890"}, {"role": "user", "content": "more"},
     {"role": "assistant", "content": "naïve café 😀"}],
]  # fmt: skip


def _chat_toks(toks):
    s_tok, t_tok = copy.deepcopy(toks[0]), copy.deepcopy(toks[1])
    t_tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    s_tok.chat_template, t_tok.chat_template = STUDENT_TEMPLATE, TEACHER_TEMPLATE
    return s_tok, t_tok


def test_chat_rows_are_rendered_by_each_template_and_aligned_inside_the_answers(toks):
    from distill.data.rows import row_from_object, tokenize_rows

    s_tok, t_tok = _chat_toks(toks)
    retok = Retokenizer(t_tok, s_tok)
    for k, chat in enumerate(CHATS):
        e = tokenize_rows([row_from_object({"messages": chat}, f"row {k}")], s_tok, 128)[0]
        t_ids = retok.teacher_ids(e)
        assert t_tok.decode(t_ids).startswith("<bos><start_of_turn>")  # the teacher's own template
        a = retok.alignment(e, t_ids)
        s_tab, t_tab = token_bytes(s_tok), token_bytes(t_tok)
        answers = [m["content"].encode() for m in chat if m["role"] == "assistant"]
        for g in a.groups:  # groups lie inside answers and hold the same bytes on both sides
            got = b"".join(s_tab[e.input_ids[i]] for i in g.student)
            assert got == b"".join(t_tab[t_ids[j]] for j in g.teacher) and any(got in ans for ans in answers)
        assert sorted(b"".join(s_tab[e.input_ids[i]] for g in a.groups for i in g.student)) == sorted(b"".join(answers))
        for s, t in a.pairs:  # every pair predicts an answer token, which the student learns
            assert e.labels[s + 1] != -100


def test_chat_rows_train_live_cached_and_on_policy(cross_tree, toks, tmp_path):
    from distill.pipeline.cache import write_teacher_cache

    s_tok, t_tok = _chat_toks(toks)
    s_tok.save_pretrained(tmp_path / "s_chat")
    t_tok.save_pretrained(tmp_path / "t_chat")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS * 8))
    cross_tree["student"]["tokenizer"], cross_tree["teacher"]["tokenizer"] = str(tmp_path / "s_chat"), str(tmp_path / "t_chat")
    cross_tree["teacher"]["config"] = {**TINY_TEACHER, "vocab_size": len(t_tok)}
    cross_tree["data"] = {"source": str(data), "max_length": 96}
    cross_tree["train"]["steps"] = 2
    train(build_config(cross_tree), show_progress=False)
    live = read_metrics(cross_tree["out_dir"])
    assert all(0.5 < r["aligned"] < 1.0 for r in live)  # the answers' end-of-turn tokens have no pair
    write_teacher_cache(build_config(cross_tree), tmp_path / "cache", len(t_tok), "float32", 8, 8, show_progress=False)
    cached = copy.deepcopy(cross_tree)
    cached["teacher_cache"], cached["out_dir"] = str(tmp_path / "cache"), str(tmp_path / "cached")
    train(build_config(cached), show_progress=False)
    for a, b in zip(live, read_metrics(cached["out_dir"])):
        assert b["aligned"] == a["aligned"] and b["kd"] == pytest.approx(a["kd"], abs=1e-5)
    on_policy = copy.deepcopy(cross_tree)
    on_policy["on_policy"], on_policy["out_dir"] = {"lmbda": 1.0, "max_new_tokens": 6}, str(tmp_path / "op")
    train(build_config(on_policy), show_progress=False)
    assert all(torch.isfinite(torch.tensor(r["kd"])) for r in read_metrics(on_policy["out_dir"]))
