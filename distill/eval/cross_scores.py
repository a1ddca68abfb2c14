"""A student against a teacher of another tokenizer, on held-out rows (T = 1).

Per-token scores of the two models are not comparable (their tokens differ), so:

    bits_per_byte      each model's cross-entropy over its own tokens of the labelled text,
                       summed and divided by the text's bytes (x 1/ln 2): comparable across
                       tokenizers; the student's per-token perplexity is reported beside it
    at the KD pairs    (`distill.data.alignment`: both predict from the same text)
      forward_kl       the bucket forward KL(teacher || student) the cross-tokenizer KD uses
      agreement_top1   the student's most likely token is the image of the teacher's
      coverage         the share of the student's label tokens that have a pair
"""

import math

import torch

from distill.data.rows import Example, collate
from distill.data.token_bytes import text_of
from distill.loss.cross_tokenizer import bucket_divergence, teacher_in_student_space
from distill.loss.token_losses import IGNORE_INDEX
from distill.models.last_position import last_position
from distill.training.cross_teacher import PAIR_CHUNK, Retokenizer, attach_pairs, head_logits


def _teacher_targets(retok: Retokenizer, e: Example, t_ids: list[int], width: int) -> list[bool]:
    """Which of the teacher's next-token targets (positions 1..) cover the student's labelled
    text: its tokens in alignment groups that hold a labelled student token, and its EOS
    where the student's labelled EOS ends the row."""
    keep = [False] * len(t_ids)
    for g in retok.alignment(e, t_ids).groups:
        if any(e.labels[i] != IGNORE_INDEX for i in g.student):
            for j in g.teacher:
                keep[j] = True
    if t_ids and t_ids[-1] == retok.t_eos and e.input_ids[-1] == retok.s_eos and e.labels[-1] != IGNORE_INDEX:
        keep[-1] = True
    return keep[1:] + [False] * (width - len(t_ids))


def _teacher_ce(teacher, hidden: torch.Tensor, ids: torch.Tensor, where: torch.Tensor, t_vocab: int) -> float:
    """Sum of the teacher's next-token CE over the targets `where` (B, Tt-1)."""
    h, y = hidden[:, :-1][where], ids[:, 1:][where]  # (n, H), (n,)
    total = 0.0
    for a in range(0, h.shape[0], PAIR_CHUNK):
        logits = head_logits(teacher, h[a : a + PAIR_CHUNK])[:, :t_vocab].float()
        total += torch.nn.functional.cross_entropy(logits, y[a : a + PAIR_CHUNK], reduction="sum").item()
    return total


@torch.no_grad()
def cross_scores(student, teacher, retok: Retokenizer, examples: list[Example], batch_size: int, vocab: int, pad_id: int) -> dict:
    """The scores above over `examples` (the student's tokenization of held-out rows)."""
    device = next(student.parameters()).device
    t_pad = retok.t_tok.pad_token_id if retok.t_tok.pad_token_id is not None else 0
    t2s, t_vocab = retok.vmap.t2s.to(device), retok.vmap.teacher_vocab
    sums = dict.fromkeys(("s_ce", "t_ce", "labels", "bytes", "pairs", "kl", "agree"), 0.0)
    for a in range(0, len(examples), batch_size):
        chunk = examples[a : a + batch_size]
        batch = collate(chunk, pad_id)
        t_ids = [retok.teacher_ids(e) for e in chunk]
        b = {k: v.to(device) for k, v in attach_pairs(retok, batch, chunk, t_ids, t_pad).items()}
        width = b["teacher_input_ids"].shape[1]
        t_where = torch.tensor([_teacher_targets(retok, e, t, width) for e, t in zip(chunk, t_ids)], device=device)
        logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[..., :vocab].float()
        targets = b["labels"][:, 1:]
        valid = targets != IGNORE_INDEX
        sums["s_ce"] += torch.nn.functional.cross_entropy(logits[:, :-1][valid], targets[valid], reduction="sum").item()
        sums["labels"] += float(valid.sum())
        sums["bytes"] += sum(len(text_of([y for y in e.labels if y != IGNORE_INDEX], retok.vmap.s_table)) for e in chunk)
        out = teacher(input_ids=b["teacher_input_ids"], attention_mask=b["teacher_attention_mask"], output_hidden_states=True, logits_to_keep=last_position(b["teacher_input_ids"]))
        hidden = out.hidden_states[-1]
        sums["t_ce"] += _teacher_ce(teacher, hidden, b["teacher_input_ids"], t_where, t_vocab)
        s_pairs, t_pairs = logits[b["pair_row"], b["pair_s"]], hidden[b["pair_row"], b["pair_t"]]
        for c in range(0, s_pairs.shape[0], PAIR_CHUNK):
            lp = torch.log_softmax(head_logits(teacher, t_pairs[c : c + PAIR_CHUNK])[:, :t_vocab].float(), -1)
            s = s_pairs[c : c + PAIR_CHUNK]
            t_log, own, rest, _ = teacher_in_student_space(lp, t2s, vocab)
            sums["kl"] += bucket_divergence("forward_kl", s, t_log, own, rest).sum().item()
            sums["agree"] += float((t2s[lp.argmax(-1)] == s.argmax(-1)).sum())
            sums["pairs"] += s.shape[0]
    n, pairs, nbytes = max(sums["labels"], 1.0), max(sums["pairs"], 1.0), max(sums["bytes"], 1.0)
    return {
        "student": {"bits_per_byte": sums["s_ce"] / nbytes / math.log(2), "perplexity": math.exp(sums["s_ce"] / n)},
        "teacher": {"bits_per_byte": sums["t_ce"] / nbytes / math.log(2)},
        "forward_kl": sums["kl"] / pairs,
        "agreement_top1": sums["agree"] / pairs,
        "coverage": sums["pairs"] / n,
        "pairs": int(sums["pairs"]),
        "bytes": int(sums["bytes"]),
    }
