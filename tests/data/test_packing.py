"""Packing: rows into blocks with attention kept inside each row. A packed document gets
the logits it gets alone (llama, qwen2, gemma3; sdpa and eager), an earlier document never
moves a later one, and the loss counts every target once, as the rows alone do."""

import itertools

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from distill.config import build_config
from distill.data.build import build_examples, build_rows, build_task_examples
from distill.data.packing import check_isolation, document_starts, model_inputs, pack_examples, split_examples
from distill.data.rows import Example, Row, collate, tokenize_rows
from distill.data.tasks.tokenizer import chain_tokenizer
from distill.errors import ConfigError, DistillError
from distill.loss.terms import fused_term_sums, term_sums
from distill.loss.token_losses import IGNORE_INDEX

from helpers import TINY_GEMMA3, TINY_QWEN2, TINY_STUDENT, TINY_TEACHER, text_rows, write_text_rows

TOK = chain_tokenizer()
FAMILIES = {"llama": TINY_STUDENT, "qwen2": TINY_QWEN2, "gemma3": TINY_GEMMA3}


def tiny(cfg: dict, attn: str = "sdpa", seed: int = 0):
    cfg = dict(cfg)
    conf = AutoConfig.for_model(cfg.pop("model_type"), **cfg, vocab_size=len(TOK), pad_token_id=TOK.pad_token_id)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(conf, attn_implementation=attn).eval()


def documents(n: int = 7, seed: int = 0) -> list[Example]:
    rows = [Row("", r["text"]) for r in text_rows(n, seed, words=(2, 6))]
    return tokenize_rows(rows, TOK, 64)


def test_blocks_hold_every_row_once_with_positions_and_labels_per_document():
    docs = documents(40)
    blocks = pack_examples(docs, 48)
    assert len(blocks) < len(docs) and all(len(b.input_ids) <= 48 for b in blocks)
    seen = []
    for b in blocks:
        assert len(b.input_ids) == len(b.labels) == len(b.position_ids)
        starts = [i for i, p in enumerate(b.position_ids) if p == 0]
        for s, e in itertools.pairwise([*starts, len(b.input_ids)]):
            assert b.position_ids[s:e] == list(range(e - s))
            assert b.input_ids[e - 1] == TOK.eos_token_id  # each document ends in its EOS
            assert b.labels[s] == IGNORE_INDEX  # never predicted from the document before
            assert b.labels[s + 1 : e] == b.input_ids[s + 1 : e]
            seen.append(b.input_ids[s:e])
    assert sorted(seen) == sorted(d.input_ids for d in docs)
    assert pack_examples(docs, 48) == blocks  # deterministic
    with pytest.raises(ValueError, match="over the block length"):
        pack_examples(docs, 4)


def test_split_rows_fill_every_block_and_keep_every_token_once_in_order():
    docs = documents(40)
    blocks = split_examples(docs, 48)
    assert all(len(b.input_ids) == 48 for b in blocks[:-1]) and 0 < len(blocks[-1].input_ids) <= 48
    assert [t for b in blocks for t in b.input_ids] == [t for d in docs for t in d.input_ids]  # end to end, in order
    cuts = 0
    for b in blocks:
        starts = [i for i, p in enumerate(b.position_ids) if p == 0]
        for s, e in itertools.pairwise([*starts, len(b.input_ids)]):
            assert b.position_ids[s:e] == list(range(e - s))  # each piece a document of its own
            assert b.labels[s] == IGNORE_INDEX and b.labels[s + 1 : e] == b.input_ids[s + 1 : e]
        cuts += b.input_ids[-1] != TOK.eos_token_id  # a block ending inside a row cut it
    assert cuts > 0
    targets = sum(sum(label != IGNORE_INDEX for label in b.labels) for b in blocks)
    assert targets == sum(len(d.input_ids) - 1 for d in docs) - cuts  # one target lost per cut, no other
    long = tokenize_rows([Row("", "abcdefghij" * 10)], TOK, 1000)[0]
    pieces = split_examples([long], 12)  # a row over the block length is cut, not refused
    assert [len(b.input_ids) for b in pieces] == [12] * 8 + [5]


def test_split_rows_refuse_unpacked_data_and_bound_no_row_length(tmp_path, tiny_tree):
    data = write_text_rows(tmp_path / "t.jsonl", 60)
    tiny_tree["data"] = {"source": str(data), "max_length": 16, "split_rows": True}
    cfg = build_config(tiny_tree)
    blocks = build_examples(cfg.data, TOK)  # rows over 16 tokens: cut across blocks, no error
    assert all(len(b.input_ids) == 16 for b in blocks[:-1]) and cfg.data.cuts_long_rows
    tiny_tree["data"]["packing"] = False
    with pytest.raises(ConfigError, match="data.split_rows=true cuts rows across packed blocks, but data.packing is off"):
        build_config(tiny_tree)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Q:1+2=", "completion": "3"}\n' * 4)
    tiny_tree["data"] = {"source": str(prompts), "split_rows": True}  # prompt rows: packing null resolves to off
    with pytest.raises(DistillError, match=r"data.split_rows=true cuts rows across packed blocks, but .*p.jsonl is not"):
        build_examples(build_config(tiny_tree).data, TOK)


def test_collate_gives_padding_its_own_positions():
    blocks = pack_examples(documents(6), 40)
    batch = collate(blocks, TOK.pad_token_id)
    for row, b in enumerate(blocks):
        n = len(b.input_ids)
        assert batch["position_ids"][row, :n].tolist() == b.position_ids
        assert batch["position_ids"][row, n:].tolist() == list(range(batch["input_ids"].shape[1] - n))
    assert set(model_inputs(batch)) == {"input_ids", "position_ids", "use_cache"}
    assert set(model_inputs(collate(documents(2), TOK.pad_token_id))) == {"input_ids", "attention_mask"}
    assert torch.equal(document_starts(batch), batch["position_ids"] == 0)  # documents and the pad run
    with pytest.raises(ValueError, match="mixes packed blocks and whole rows"):
        collate([blocks[0], documents(1)[0]], TOK.pad_token_id)


@pytest.mark.parametrize("packer", [pack_examples, split_examples], ids=["whole-rows", "split-rows"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_packed_document_gets_the_logits_it_gets_alone(family, attn, packer):
    model = tiny(FAMILIES[family], attn)
    docs = documents(7)
    assert max(len(d.input_ids) for d in docs) > 4  # longer than gemma3's sliding window
    blocks = packer(docs, 40)
    batch = collate(blocks, TOK.pad_token_id)
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits  # (B, T, V)
        for row, b in enumerate(blocks):
            starts = [i for i, p in enumerate(b.position_ids) if p == 0] + [len(b.input_ids)]
            for s, e in itertools.pairwise(starts):
                alone = model(input_ids=torch.tensor([b.input_ids[s:e]])).logits[0]  # (n, V)
                torch.testing.assert_close(packed[row, s:e], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("family", "attn", "how"),
    [("llama", "sdpa", "positions with a cache"), ("llama", "eager", "4D bool mask"), ("gemma3", "sdpa", "4D float mask")],
)
def test_the_ways_that_do_not_keep_documents_apart(family, attn, how):
    """Why `model_inputs` passes position ids, no mask and use_cache=False (transformers 5):
    with a KV cache transformers skips its packed-sequence check; eager attention adds a
    boolean 4D mask to the scores instead of applying it; one 4D mask for Gemma 3 loses its
    sliding window. A packed document then differs from the document alone."""
    model = tiny(FAMILIES[family], attn)
    blocks = pack_examples(documents(7), 40)
    b = blocks[0]
    batch = collate([b], TOK.pad_token_id)
    seg = torch.tensor(b.position_ids).eq(0).cumsum(0)  # (T,) document index
    allowed = torch.ones(len(seg), len(seg)).tril().bool() & (seg[:, None] == seg[None, :])  # (T, T)
    mask = allowed[None, None] if "bool" in how else torch.zeros(allowed.shape).masked_fill(~allowed, -1e30)[None, None]
    with torch.no_grad():
        if how == "positions with a cache":
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        else:
            packed = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]).logits[0]
        starts = [i for i, p in enumerate(b.position_ids) if p == 0] + [len(b.input_ids)]
        worst = max(
            (packed[s:e] - model(input_ids=torch.tensor([b.input_ids[s:e]])).logits[0]).abs().max().item()
            for s, e in itertools.pairwise(starts)
        )
    assert worst > 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_token_attends_across_a_document_boundary(family):
    """Changing the first document leaves the second's logits exactly as they were; the
    same change under one plain causal mask does move them (the test can see a leak)."""
    model = tiny(FAMILIES[family])
    a, b = [TOK.convert_tokens_to_ids(c) for c in "abcdefg"], [TOK.convert_tokens_to_ids(c) for c in "hijjih"]
    other = list(reversed(a))
    blocks = [pack_examples([Example(d, d), Example(b, b)], 64)[0] for d in (a, other)]
    batch = collate(blocks, TOK.pad_token_id)
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits[:, len(a) :]  # (2, len(b), V)
        causal = model(input_ids=batch["input_ids"]).logits[:, len(a) :]
    assert torch.equal(packed[0], packed[1])
    assert (causal[0] - causal[1]).abs().max() > 1e-3


def test_the_loss_counts_every_target_once_as_the_rows_alone_do():
    """Packed term sums (dense and fused) equal the sums over each row scored alone."""
    student, teacher = tiny(TINY_STUDENT, seed=0), tiny(TINY_TEACHER, seed=1)
    docs = documents(9)
    blocks = pack_examples(docs, 40)
    batch = collate(blocks, TOK.pad_token_id)
    vocab, kw = len(TOK), {"temperature": 2.0, "divergence_name": "jsd", "divergence_params": {"beta": 0.3}}
    with torch.no_grad():
        s_out = student(**model_inputs(batch), output_hidden_states=True)
        t_out = teacher(**model_inputs(batch), output_hidden_states=True)
        packed = term_sums(s_out.logits, batch["labels"], t_out.logits, vocab, **kw)
        _, fused = fused_term_sums(s_out.hidden_states[-1], student.lm_head, t_out.hidden_states[-1], teacher.lm_head,
                                   batch["labels"], vocab, 0.5, 2.0, chunk_size=5, **kw)  # fmt: skip
        alone = {"task_ce": 0.0, "kd": 0.0}
        for d in docs:
            one = collate([d], TOK.pad_token_id)
            sums = term_sums(student(**model_inputs(one)).logits, one["labels"], teacher(**model_inputs(one)).logits, vocab, **kw)
            for k in alone:
                alone[k] += sums[k].item()
    n_targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
    assert n_targets == sum(len(d.input_ids) - 1 for d in docs)  # a text row's targets: all tokens but its first
    for k, total in alone.items():
        assert packed[k].item() == pytest.approx(total, rel=1e-5)
        assert fused[k].item() == pytest.approx(total, rel=1e-5)


def test_truncate_cuts_long_rows_and_without_it_they_are_refused():
    rows = [Row("", "abcdefghij" * 3), Row("", "abc")]
    with pytest.raises(DistillError, match=r"row 1 is 31 tokens, over data.max_length=12 \(data.truncate=true cuts"):
        tokenize_rows(rows, TOK, 12, source="d.jsonl")
    cut = tokenize_rows(rows, TOK, 12, truncate=True)
    assert [len(e.input_ids) for e in cut] == [12, 4]
    assert cut[0].input_ids == TOK("abcdefghijab", add_special_tokens=False).input_ids  # the first 12, no EOS
    assert cut[0].labels == cut[0].input_ids and cut[1].input_ids[-1] == TOK.eos_token_id
    with pytest.raises(DistillError, match="row 1 has a 12-token prompt"):
        tokenize_rows([Row("abcdefghijkl", "xyz")], TOK, 12, truncate=True)


def test_text_rows_pack_by_default_and_prompt_rows_do_not(tmp_path, tiny_tree):
    data = write_text_rows(tmp_path / "t.jsonl", 60)
    tiny_tree["data"] = {"source": str(data), "max_length": 64}
    cfg = build_config(tiny_tree)
    blocks = build_examples(cfg.data, TOK)
    rows = build_rows(cfg.data, "train")
    assert all(b.position_ids is not None for b in blocks) and len(blocks) < len(rows)
    assert sum(b.position_ids.count(0) for b in blocks) == len(rows)
    tiny_tree["data"]["packing"] = False
    assert len(build_examples(build_config(tiny_tree).data, TOK)) == len(rows)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Q:1+2=", "completion": "3"}\n' * 4)
    tiny_tree["data"] = {"source": str(prompts)}
    assert all(e.position_ids is None for e in build_task_examples(build_config(tiny_tree), TOK)[0])
    tiny_tree["data"]["packing"] = True
    assert len(build_task_examples(build_config(tiny_tree), TOK)[0]) == 1


@pytest.mark.parametrize(
    ("section", "message"),
    [({"on_policy": {"lmbda": 0.5}}, "on_policy.lmbda > 0 samples completions"),
     ({"rationale": {"mode": "multitask"}}, "rationale.mode=multitask trains two tasks")],
)  # fmt: skip
def test_packing_with_what_needs_whole_rows_is_a_config_error(tiny_tree, section, message):
    tiny_tree.update(section)
    assert build_config(tiny_tree).data.packing is False  # null resolves to whole rows
    tiny_tree["data"]["packing"] = True
    with pytest.raises(ConfigError, match=f"data.packing=true packs rows into blocks, but {message}"):
        build_config(tiny_tree)


class _IgnoresPositions(torch.nn.Module):
    """A model whose attention ignores packed position ids: one causal mask over the block."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids=None, **kwargs):
        return self.model(input_ids=input_ids, **kwargs)


def test_a_model_that_lets_documents_see_each_other_is_refused():
    blocks = pack_examples(documents(12), 64)
    check_isolation({"student": tiny(TINY_STUDENT), "teacher": tiny(TINY_GEMMA3)}, blocks)  # passes
    with pytest.raises(DistillError, match="data.packing: the teacher's attention crosses document boundaries"):
        check_isolation({"student": tiny(TINY_STUDENT), "teacher": _IgnoresPositions(tiny(TINY_TEACHER))}, blocks)
