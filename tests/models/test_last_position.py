"""`last_position`: the last position's logits, as `logits_to_keep=1` gives them, without the
strided slice that makes torch's CPU bf16 linear copy the lm_head weight once per row."""

import pytest
import torch

from distill.models.last_position import last_position
from distill.models.loading import load_causal_lm

SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "intermediate_size": 96, "max_position_embeddings": 64, "vocab_size": 300}  # fmt: skip
FAMILIES = {
    "llama": {"model_type": "llama"},
    "qwen2": {"model_type": "qwen2"},
    "gemma3_text": {"model_type": "gemma3_text", "sliding_window": 4, "final_logit_softcapping": 30.0},
}


def _model(family: str, dtype=torch.float32):
    torch.manual_seed(0)
    return load_causal_lm(config={**SHAPE, **FAMILIES[family]}).to(dtype).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_same_logits_as_the_int(family):
    model = _model(family)
    ids = torch.randint(0, 300, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        mine = model(input_ids=ids, logits_to_keep=last_position(ids))
        theirs = model(input_ids=ids, logits_to_keep=1)
    assert mine.logits.shape == (3, 1, 300)
    assert torch.equal(mine.logits, theirs.logits)
    torch.testing.assert_close(mine.logits, full[:, -1:], rtol=1e-5, atol=1e-5)


def _lm_head_bmm_shapes(model, ids, keep) -> list:
    """Input shapes of the batched matmuls over the vocabulary in one forward."""
    with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
        model(input_ids=ids, logits_to_keep=keep)
    return [e.input_shapes for e in prof.events() if e.name == "aten::bmm" and any(s and s[-1] == 300 for s in e.input_shapes)]


def test_bf16_lm_head_is_one_matmul():
    """In bf16 on CPU, with a weight that needs no gradient (a frozen teacher, the bf16
    sampling copy), the int's strided (B, 1, D) slice sends the lm_head through a batched
    matmul over a (B, D, V) copy of its weight; the index keeps it one plain matmul."""
    model = _model("llama", torch.bfloat16).requires_grad_(False)  # frozen, as a teacher or the sampling copy
    ids = torch.randint(0, 300, (4, 9), generator=torch.Generator().manual_seed(2))
    if not _lm_head_bmm_shapes(model, ids, 1):
        pytest.skip("this torch's CPU bf16 linear takes the strided slice without the batched copy")
    assert _lm_head_bmm_shapes(model, ids, last_position(ids)) == []
