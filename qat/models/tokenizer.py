"""A byte-level tokenizer for the tiny random test model (no download, no vocab file)."""
from __future__ import annotations

from typing import Any


class ByteTokenizer:
    """ids 0..255 are bytes; 256 is end-of-text."""

    vocab_size = 257
    eos_token_id = 256
    name_or_path = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def hf_byte_tokenizer() -> Any:
    """ByteTokenizer as a transformers tokenizer (same ids: bytes 0..255, end-of-text 256), for
    tools that take only those (lm-evaluation-harness) and for the tiny model's exports."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab["<eot>"] = ByteTokenizer.eos_token_id
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eot>", pad_token="<eot>")
