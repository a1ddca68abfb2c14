"""Two tiny real tokenizers of different kinds, trained here on a small corpus (no hub):
a byte-level BPE like SmolLM2's (no BOS) and a SentencePiece-style BPE with byte fallback
like Gemma's (adds a BOS, spaces as '▁')."""

import json

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "the cat sat on the mat and the dog sat on the log",
    "numbers like 12345 and 67890 are split in many ways",
    "a quick brown fox jumps over the lazy dog near the river bank",
    "naïve café déjà vu über straße",
    "distillation trains a small student to imitate a large teacher",
] * 8


def byte_level_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token="<|im_start|>", model_input_names=["input_ids", "attention_mask"])  # fmt: skip


def sentencepiece_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """BPE over '▁'-joined words with byte fallback: a character it never saw becomes its
    UTF-8 bytes, <0xNN> tokens."""
    base = Tokenizer(models.BPE())
    base.normalizer = normalizers.Replace(" ", "\u2581")
    base.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"])
    base.train_from_iterator(CORPUS, trainer)
    trained = json.loads(base.to_str())["model"]
    vocab = {t: i for t, i in trained["vocab"].items()}
    for b in range(256):  # byte-fallback pieces, ordinary vocabulary entries as in Gemma
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>"])
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>",
                                   unk_token="<unk>", model_input_names=["input_ids", "attention_mask"])  # fmt: skip
