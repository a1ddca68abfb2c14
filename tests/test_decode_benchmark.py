"""benchmarks/decode.py's fused-projection variant computes what the model computes."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from distill.training.rollout import Sampling, rollout

from helpers import load_benchmark

decode = load_benchmark("decode")


def test_fused_projections_give_the_same_logits_and_samples():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg).double().eval()
    fused = decode.fuse_projections(model)
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert attn.q_proj.group is attn.v_proj.group and mlp.gate_proj.group is mlp.up_proj.group
    assert attn.q_proj.group.weight.shape == (32 + 16 + 16, 32)  # 4 query heads, 2 KV heads of 8
    ids = torch.randint(2, 40, (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, model(ids).logits)
    prompts, sampling = [[5, 6, 7], [8, 9]], Sampling(10, temperature=1.0)
    assert rollout(fused, prompts, sampling, 1, 0, [1, 2]) == rollout(model, prompts, sampling, 1, 0, [1, 2])
