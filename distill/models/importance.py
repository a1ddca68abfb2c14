"""How much each part of a decoder matters, measured on calibration text (Minitron style).

A pass over each calibration batch with forward hooks collects, over real (not padding)
tokens:

- per layer, block influence: 1 - cos(layer input, layer output), per token (ShortGPT);
- per layer and query head: the L2 norm of the head's attention output (o_proj's input);
- per layer and MLP neuron: |act(gate) * up| (down_proj's input);
- per layer and hidden channel: |output| of each hidden-size norm of the layer (the
  normalized hidden states; gemma3's four norms, llama / qwen2's two), and the final norm's.

Then, per layer, the batch's calibration loss with that layer skipped (its output replaced
by its input). The layers before it return the outputs recorded in the first pass instead
of computing them again, so the L skip passes cost about half of L full forwards.

Every statistic is a float64 sum over tokens divided by the token count at the end, so
neither the order nor the batching of the calibration rows changes a ranking (only float
rounding in the model's own forward, far below the gaps).
"""

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distill.models.students import decoder_layers

HIDDEN_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
"""The hidden-size norms a decoder layer may hold (q_norm / k_norm work on head_dim: not these)."""
LOGITS_BUDGET = 2**27
"""Most logits (floats) one forward may produce: big vocabularies run fewer rows at a time."""


@dataclass
class Importance:
    """Mean scores over the calibration tokens of one model.

    Attributes:
        tokens: Real calibration tokens (statistics) and predicted tokens (losses).
        loss: Mean next-token cross-entropy of the whole model.
        skip_loss: (L,) the same loss with layer i skipped.
        block_influence: (L,) mean 1 - cos(input, output) of each layer.
        heads: (L, n_heads) mean L2 norm of each query head's attention output.
        neurons: (L, intermediate) mean |act(gate) * up| of each MLP neuron.
        hidden: (L, hidden) mean |normalized hidden state| per channel, summed over each
            layer's hidden-size norms.
        hidden_final: (hidden,) the same for the final norm.
    """

    tokens: int
    predicted: int
    loss: float
    skip_loss: torch.Tensor
    block_influence: torch.Tensor
    heads: torch.Tensor
    neurons: torch.Tensor
    hidden: torch.Tensor
    hidden_final: torch.Tensor

    @property
    def skip_increase(self) -> torch.Tensor:
        """(L,) how much the calibration loss rises when each layer is skipped."""
        return self.skip_loss - self.loss

    def hidden_scores(self, layers: list[int]) -> torch.Tensor:
        """(hidden,) channel scores over the norms of the given layers and the final norm."""
        return self.hidden[layers].sum(0) + self.hidden_final


class _Recorder:
    """Forward hooks that add per-token statistics of one batch to float64 sums."""

    def __init__(self, model):
        _, self.layers = decoder_layers(model)
        text = model.config.get_text_config()
        n, self.n_heads = len(self.layers), text.num_attention_heads
        f64 = {"dtype": torch.float64}
        self.mask: torch.Tensor | None = None  # (B, T) bool, real tokens of the current batch
        self.tokens = 0
        self.block_influence = torch.zeros(n, **f64)  # (L,)
        self.heads = torch.zeros(n, self.n_heads, **f64)  # (L, h)
        self.neurons = torch.zeros(n, text.intermediate_size, **f64)  # (L, I)
        self.hidden = torch.zeros(n, text.hidden_size, **f64)  # (L, H)
        self.hidden_final = torch.zeros(text.hidden_size, **f64)  # (H,)
        self.final_norm = model.get_decoder().norm
        self.outputs: list = [None] * n  # each layer's raw output in the current batch's pass

    def _real(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...) float64 rows of the real tokens."""
        return x[self.mask].double()

    @contextmanager
    def attached(self):
        handles = [self.final_norm.register_forward_hook(self._norm_hook(self.hidden_final))]
        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_hook(self._layer_hook(i), with_kwargs=True))
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(self._heads_hook(i)))
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._neurons_hook(i)))
            for name in HIDDEN_NORMS:
                if hasattr(layer, name):
                    handles.append(getattr(layer, name).register_forward_hook(self._norm_hook(self.hidden[i])))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _layer_hook(self, i: int):
        def hook(module, args, kwargs, out):
            self.outputs[i] = out
            x, y = _layer_input(args, kwargs), _layer_output(out)  # (B, T, H) each
            cos = F.cosine_similarity(self._real(x), self._real(y), dim=-1)  # (N,)
            self.block_influence[i] += (1 - cos).sum()

        return hook

    def _heads_hook(self, i: int):
        def hook(module, args):
            a = args[0]  # (B, T, h * d): the heads' outputs, concatenated
            per_head = a.view(*a.shape[:2], self.n_heads, -1)  # (B, T, h, d)
            self.heads[i] += self._real(per_head).norm(dim=-1).sum(0)  # (h,)

        return hook

    def _neurons_hook(self, i: int):
        def hook(module, args):
            self.neurons[i] += self._real(args[0]).abs().sum(0)  # (B, T, I) -> (I,)

        return hook

    def _norm_hook(self, into: torch.Tensor):
        def hook(module, args, out):
            into.add_(self._real(out).abs().sum(0))  # (B, T, H) -> (H,)

        return hook


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # transformers 4 layers return tuples


def _with_hidden(out, hidden: torch.Tensor):
    """A layer output like `out` carrying `hidden` as its hidden states."""
    return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


@contextmanager
def skipping(layers, i: int, outputs: list):
    """Within the block layer i passes its input on, and layers 0..i-1 return their
    recorded `outputs` without computing (their inputs are the same as when recorded)."""
    for j in range(i):
        layers[j].forward = lambda *args, _out=outputs[j], **kwargs: _out
    layers[i].forward = lambda *args, _out=outputs[i], **kwargs: _with_hidden(_out, _layer_input(args, kwargs))
    try:
        yield
    finally:
        for j in range(i + 1):
            del layers[j].forward  # the class's forward again


def _chunks(model, batches: list[dict]):
    """(input_ids, attention_mask), (b, T) each: the batches, split where the logits would be too big."""
    vocab = model.get_output_embeddings().weight.shape[0]
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]  # (B, T)
        step = max(1, LOGITS_BUDGET // (ids.shape[1] * vocab))
        for start in range(0, ids.shape[0], step):
            yield ids[start : start + step], mask[start : start + step]


def _loss_sum(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """(sum of next-token cross-entropies, predicted tokens) of one right-padded (b, T) chunk."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()  # (b, T, V)
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # (b, T-1)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")  # (b, T-1)
    return float(ce.double().sum()), int((labels != -100).sum())


@torch.inference_mode()
def measure_importance(model, batches: list[dict], progress: Callable[[int, int, float, int], None] | None = None) -> Importance:
    """Score layers, heads, neurons and hidden channels of `model` on calibration batches.

    Args:
        model: A llama / qwen2 / gemma3_text causal LM (hooks find self_attn.o_proj,
            mlp.down_proj and the norms by these names).
        batches: From `calibration.calibration_batches`: right-padded `input_ids` and
            `attention_mask`, (B, T) each.
        progress: Called after each chunk of rows with (chunks done, chunks, mean loss so
            far, tokens so far).

    Returns:
        The mean scores over the calibration tokens.
    """
    was_training = model.training
    model.eval()
    recorder = _Recorder(model)
    layers, chunks = recorder.layers, list(_chunks(model, batches))
    total, predicted, skip = 0.0, 0, torch.zeros(len(layers), dtype=torch.float64)  # skip: (L,)
    if progress is not None:
        progress(0, len(chunks), float("nan"), 0)
    for done, (ids, mask) in enumerate(chunks, 1):
        recorder.mask = mask.bool()
        recorder.tokens += int(mask.sum())
        with recorder.attached():
            loss, count = _loss_sum(model, ids, mask)
        total, predicted = total + loss, predicted + count
        for i in range(len(layers)):
            with skipping(layers, i, recorder.outputs):
                skip[i] += _loss_sum(model, ids, mask)[0]
        if progress is not None:
            progress(done, len(chunks), total / predicted, recorder.tokens)
    model.train(was_training)
    n = recorder.tokens
    return Importance(
        tokens=n,
        predicted=predicted,
        loss=total / predicted,
        skip_loss=skip / predicted,
        block_influence=recorder.block_influence / n,
        heads=recorder.heads / n,
        neurons=recorder.neurons / n,
        hidden=recorder.hidden / n,
        hidden_final=recorder.hidden_final / n,
    )
