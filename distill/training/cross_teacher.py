"""Teachers of another tokenizer (`objective.cross_tokenizer`): the same three questions as
`distill.training.teachers`, answered by retokenizing every student row for the teacher.

    attach      the student row's bytes (its tokens' bytes: dataset rows and on-policy samples
                alike) -> the teacher's tokenization of that text (its BOS, and its EOS where
                the student row ends with one) -> the KD pairs (`distill.data.alignment`):
                teacher_input_ids / teacher_attention_mask (B, Tt), pair_row / pair_s / pair_t (M,)
    forward     the teacher's last hidden states at the pairs (no (B, Tt, Vt) logits)
    logit_terms task CE on every label; KD (`distill.loss.cross_tokenizer`) summed over the
                pairs, the bucket divergence (+ ULD on the leftovers with "uld"); `aligned`
                counts the pairs, so its recorded mean is the share of tokens with a KD pair

A sample that ends inside a UTF-8 character is aligned up to the last whole one. The cached
kind reads the teacher's tokens and top-k from a cross-tokenizer `distill cache` and aligns
the same way, with no teacher model.
"""

import torch

from distill.config import RunConfig
from distill.data import chat
from distill.data.alignment import Segment, align, prefix_shift, spans
from distill.data.rows import Example
from distill.data.token_bytes import VocabMap, text_of, utf8_prefix
from distill.errors import DistillError
from distill.loss.cross_tokenizer import bucket_divergence, teacher_in_student_space, uld
from distill.loss.terms import combine, term_sums
from distill.loss.token_losses import IGNORE_INDEX
from distill.models.last_position import last_position

PAIR_CHUNK = 128  # pairs per teacher-logit chunk: 128 x 262k fp32 logits = 134 MB


SAMPLE = None  # the content of a sampled assistant turn in Example.messages: the example's labelled tokens


class Retokenizer:
    """A student example -> the teacher's tokens of the same text, and their alignment.

    A plain row is its tokens' bytes. A chat row (Example.messages) is rendered by the
    teacher's own chat template; the two renderings then differ outside the messages, and
    the alignment runs inside each assistant message's content, found in both renderings.
    """

    def __init__(self, teacher_tokenizer, student_tokenizer):
        self.vmap = VocabMap(teacher_tokenizer, student_tokenizer)
        self.t_tok, self.s_eos, self.t_eos = teacher_tokenizer, student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id

    def conversation(self, e: Example) -> tuple:
        """The example's messages, a sampled assistant turn (content SAMPLE) filled with the
        text of the example's labelled tokens."""
        answer = [y for y in e.labels if y != IGNORE_INDEX]
        text = utf8_prefix(text_of(answer, self.vmap.s_table)).decode("utf-8")
        return tuple((role, text if content is SAMPLE else content) for role, content in e.messages)

    def teacher_ids(self, e: Example | list[int]) -> list[int]:
        """The teacher's tokens of the example's text: its own special tokens (BOS), the text,
        and its EOS where the student row ends with the student's; a chat row as the
        teacher's template renders it."""
        e = e if isinstance(e, Example) else Example(e, e)
        if e.messages is not None:
            chat.check_template(self.t_tok, "teacher tokenizer")
            rendered = chat.render(self.t_tok, self.conversation(e), False, "the teacher's chat template")
            return self.t_tok(rendered, add_special_tokens=False).input_ids
        s_ids = e.input_ids
        text = utf8_prefix(text_of(s_ids, self.vmap.s_table)).decode("utf-8")
        ids = self.t_tok(text, add_special_tokens=True).input_ids
        if s_ids and s_ids[-1] == self.s_eos and self.t_eos is not None and (not ids or ids[-1] != self.t_eos):
            ids = ids + [self.t_eos]
        return ids

    def pairs(self, e: Example | list[int], t_ids: list[int]) -> list[tuple[int, int]]:
        """(student position, teacher position) of each KD pair of one row."""
        return self.alignment(e, t_ids).pairs

    def alignment(self, e: Example | list[int], t_ids: list[int]):
        e = e if isinstance(e, Example) else Example(e, e)
        s_ids = e.input_ids
        s_bytes, t_bytes = text_of(s_ids, self.vmap.s_table), text_of(t_ids, self.vmap.t_table)
        s_spans = spans(s_ids, self.vmap.s_table)
        if e.messages is not None:
            segments = assistant_segments(s_bytes, t_bytes, self.conversation(e))
            return align(s_spans, spans(t_ids, self.vmap.t_table), len(s_bytes), segments=segments)
        text = utf8_prefix(s_bytes)
        shift = prefix_shift(t_bytes, text, "the teacher tokenizer")
        s_eos = len(s_ids) - 1 if s_ids and s_ids[-1] == self.s_eos and text == s_bytes else None
        t_eos = len(t_ids) - 1 if t_ids and t_ids[-1] == self.t_eos and s_eos is not None else None
        return align(s_spans, spans(t_ids, self.vmap.t_table, shift), len(text), s_eos, t_eos)


def assistant_segments(s_bytes: bytes, t_bytes: bytes, messages) -> list[Segment]:
    """Where each assistant message's content (templates may trim it) lies in both
    renderings, in order; a content found on one side only (a truncated row) is left out."""
    segments, at_s, at_t = [], 0, 0
    for role, content in messages:
        body = content.strip().encode() if role == "assistant" else b""
        if not body:
            continue
        i, j = s_bytes.find(body, at_s), t_bytes.find(body, at_t)
        if i < 0 or j < 0:
            continue
        segments.append((i, j, len(body)))
        at_s, at_t = i + len(body), j + len(body)
    return segments


def attach_pairs(
    retok: Retokenizer, batch: dict[str, torch.Tensor], examples: list[Example], teacher_ids: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """The batch plus the teacher's padded tokens and the KD pairs whose student target is a label."""
    B = len(teacher_ids)
    Tt = max(len(t) for t in teacher_ids)
    t_input = torch.full((B, Tt), pad_id, dtype=torch.long)
    t_mask = torch.zeros((B, Tt), dtype=torch.long)
    rows, s_pos, t_pos = [], [], []
    for b, (e, t_ids) in enumerate(zip(examples, teacher_ids)):
        t_input[b, : len(t_ids)], t_mask[b, : len(t_ids)] = torch.tensor(t_ids, dtype=torch.long), 1
        for s, t in retok.pairs(e, t_ids):
            if e.labels[s + 1] != IGNORE_INDEX:
                rows.append(b), s_pos.append(s), t_pos.append(t)
    pairs = {k: torch.tensor(v, dtype=torch.long) for k, v in (("pair_row", rows), ("pair_s", s_pos), ("pair_t", t_pos))}
    return {**batch, "teacher_input_ids": t_input, "teacher_attention_mask": t_mask, **pairs}


class _CrossObjective:
    """The KD sum over a batch's pairs, from the teacher's log-probs at the pairs."""

    fused = False

    def __init__(self, cfg: RunConfig, vocab: int, retok: Retokenizer):
        obj = cfg.objective
        self.vocab, self.temperature, self.divergence = vocab, obj.temperature, obj.divergence
        self.params, self.retok = obj.divergence_params(), retok
        self.uld_k = obj.uld_top_k if obj.cross_tokenizer == "uld" else 0
        self.t2s = retok.vmap.t2s

    def _kd(self, s_logits: torch.Tensor, teacher_chunks) -> torch.Tensor:
        """Sum over pairs; `teacher_chunks` yields (slice, teacher log-probs or top-k args)."""
        t2s = self.t2s.to(s_logits.device)
        kd = s_logits.new_zeros((), dtype=torch.float32)
        for where, lp, ids, rest in teacher_chunks:
            t_log, own, t_rest, unmatched = teacher_in_student_space(lp, t2s, self.vocab, ids, rest, self.uld_k)
            s = s_logits[where]
            kd = kd + bucket_divergence(self.divergence, s, t_log, own, t_rest, self.temperature, **self.params).sum()
            if unmatched is not None:
                kd = kd + uld(s, own, unmatched, self.temperature).sum()
        return kd

    def logit_terms(self, s_out, t_out, batch, weights):
        terms = term_sums(s_out.logits, batch["labels"], None, self.vocab, self.temperature)  # task CE
        s_logits = s_out.logits[batch["pair_row"], batch["pair_s"], : self.vocab]  # (M, Vs)
        terms["kd"] = self._kd(s_logits, self.teacher_chunks(t_out, batch))
        terms["aligned"] = torch.tensor(float(batch["pair_row"].numel()), device=s_logits.device)
        return combine(terms, *weights), terms


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from its last hidden states (..., H): the lm_head, and Gemma 2's
    final soft-capping where the config sets one."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def check_head(model, out) -> None:
    """`head_logits` of the last position equals the model's own logits (a forward with
    logits_to_keep=1 and output_hidden_states), or a one-line error naming the model."""
    mine = head_logits(model, out.hidden_states[-1][:, -1:]).float()
    if mine.shape != out.logits.shape or not torch.allclose(mine, out.logits.float(), atol=1e-3, rtol=1e-3):
        raise DistillError(
            f"teacher {type(model).__name__}: its logits are not lm_head(last hidden state) (+ soft-capping); "
            "the cross-tokenizer path cannot compute them at the aligned positions alone"
        )


class CrossTokenizerTeacher(_CrossObjective):
    """A teacher model of another tokenizer in this process."""

    kind = "live"

    def __init__(self, cfg: RunConfig, vocab: int, model, retok: Retokenizer, pad_id: int):
        super().__init__(cfg, vocab, retok)
        self.model, self.pad_id, self.checked = model, pad_id, False
        self.t_vocab = retok.vmap.teacher_vocab

    def attach(self, batch, indices, examples):
        return attach_pairs(self.retok, batch, examples, [self.retok.teacher_ids(e) for e in examples], self.pad_id)

    def forward(self, batch):
        with torch.no_grad():
            out = self.model(
                input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                output_hidden_states=True, logits_to_keep=last_position(batch["teacher_input_ids"]),
            )
        if not self.checked:
            check_head(self.model, out)
            self.checked = True
        return out.hidden_states[-1][batch["pair_row"], batch["pair_t"]]  # (M, Ht)

    def teacher_chunks(self, hidden: torch.Tensor, batch):
        for a in range(0, hidden.shape[0], PAIR_CHUNK):
            with torch.no_grad():  # the student's side is computed by the consumer, outside this block
                logits = head_logits(self.model, hidden[a : a + PAIR_CHUNK])[:, : self.t_vocab].float()  # (c, Vt)
                lp = torch.log_softmax(logits / self.temperature, dim=-1)
            yield slice(a, a + PAIR_CHUNK), lp, None, None


class CrossCachedTeacher(_CrossObjective):
    """The teacher's tokens and top-k from a cross-tokenizer `distill cache`: no model."""

    kind, model = "cache", None

    def __init__(self, cfg: RunConfig, vocab: int, cache, retok: Retokenizer):
        super().__init__(cfg, vocab, retok)
        self.cache = cache

    def attach(self, batch, indices, examples):
        got = [self.cache.cross_example(i) for i in indices]  # (teacher tokens, ids, logprobs, rest)
        out = attach_pairs(self.retok, batch, examples, [g[0] for g in got], 0)
        starts = torch.tensor([0] + [len(g[0]) - 1 for g in got]).cumsum(0)  # each row's first top-k entry
        where = starts[out["pair_row"]] + out["pair_t"]  # (M,) flat top-k row of each pair
        flat = [torch.cat([g[j] for g in got]) for j in (1, 2, 3)]
        return {**out, "teacher_ids": flat[0][where], "teacher_logprobs": flat[1][where], "teacher_rest": flat[2][where]}

    def forward(self, batch):
        return None

    def teacher_chunks(self, t_out, batch):
        n = batch["pair_row"].numel()
        for a in range(0, n, PAIR_CHUNK):
            part = slice(a, a + PAIR_CHUNK)
            yield part, batch["teacher_logprobs"][part], batch["teacher_ids"][part], batch["teacher_rest"][part]
