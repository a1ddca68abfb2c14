"""A character-level tokenizer for the built-in task, as a real transformers tokenizer.

It saves and reloads with AutoTokenizer like any hub tokenizer, so students trained on the
built-in task export as ordinary transformers folders.
"""

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# Letters are included so prompts of other simple tasks (and the rationale prefixes that
# later recipes add) tokenize without <unk>.
CHARACTERS = list("0123456789+-*=,#:?;() ") + [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [
    chr(c) for c in range(ord("a"), ord("z") + 1)
]


def chain_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; pad, bos, eos and unk as special tokens."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],  # transformers 4.x adds token_type_ids, which generate() refuses
    )
