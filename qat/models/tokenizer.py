"""A byte-level tokenizer for the tiny random test model (no download, no vocab file)."""
from __future__ import annotations


class ByteTokenizer:
    """ids 0..255 are bytes; 256 is end-of-text."""

    vocab_size = 257
    eos_token_id = 256
    name_or_path = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
