"""Corpora as {train, validation, test} lists of documents."""
from __future__ import annotations

import random

from qat.errors import QATError, check_choice

_TINY_WORDS = [
    "the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was",
    "with", "be", "by", "on", "not", "he", "this", "are", "or", "his", "from", "at",
    "which", "but", "have", "an", "they", "you", "were", "her", "she", "there", "been", "one",
    "all", "we", "their", "river", "city", "music", "language", "history", "science", "king", "war", "water",
    "light",
]


def tiny_corpus(n_docs: int = 24, words_per_doc: int = 300, seed: int = 0) -> list[tuple[str, str]]:
    """Small deterministic pseudo-English documents: for unit tests only."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        words = [rng.choice(_TINY_WORDS) for _ in range(words_per_doc)]
        docs.append((f"doc{i}", " ".join(words).capitalize() + "."))
    return docs


def load_corpus(cfg: dict) -> dict[str, list[str]]:
    source = cfg.get("source", "embedded")
    check_choice("data.source", source, ["embedded", "hf", "tiny"])
    if source == "embedded":
        from qat.data.wiki import embedded_wiki_articles, split_articles

        return split_articles(embedded_wiki_articles(), int(cfg["test_chars"]), int(cfg["val_chars"]))
    if source == "tiny":
        from qat.data.wiki import split_articles

        return split_articles(tiny_corpus(), int(cfg["test_chars"]), int(cfg["val_chars"]))
    try:
        import datasets
    except ImportError:
        raise QATError("data=hf needs the 'datasets' package") from None
    splits = {}
    for name in ("train", "validation", "test"):
        split = cfg["splits"][name]
        try:
            ds = datasets.load_dataset(cfg["path"], cfg.get("name"), split=split)
        except Exception as e:
            raise QATError(f"could not load dataset {cfg['path']!r} split {split!r}: "
                           f"{str(e).splitlines()[0]}") from None
        splits[name] = [t for t in ds[cfg.get("text_field", "text")] if t.strip()]
    return splits
