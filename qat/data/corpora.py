"""Corpora as {train, validation, test} lists of documents."""
from __future__ import annotations

import glob
import random
from pathlib import Path

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
    check_choice("data.source", source, ["embedded", "hf", "tiny", "text"])
    if source == "text":
        return text_files_corpus(cfg)
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
            ds = datasets.load_dataset(cfg["path"], cfg.get("name_cfg"), split=split)
        except Exception as e:
            raise QATError(f"could not load dataset {cfg['path']!r} split {split!r}: "
                           f"{str(e).splitlines()[0]}") from None
        # every row, empty ones included: joined with blank lines this is the test text of GPTQ's /
        # PB-LLM's / BiLLM's WikiText-2 protocol ("\n\n".join(test["text"])), so the figures compare
        splits[name] = list(ds[cfg.get("text_field", "text")])
    return splits


def text_files(what: str, pattern: str) -> list[str]:
    """The files a `data.<split>` file name or glob names; a clear error for none, empty or binary."""
    files = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
    files = [f for f in files if Path(f).is_file()]
    if not files:
        raise QATError(f"{what}={pattern!r}: no such file (a path or a glob of text files)")
    for f in files:
        head = Path(f).read_bytes()[:8192]
        if not head.strip():
            raise QATError(f"{what}={pattern!r}: {f} is empty")
        if b"\0" in head:
            raise QATError(f"{what}={pattern!r}: {f} looks binary (NUL bytes), not UTF-8 text")
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.start < len(head) - 4:  # not just a character cut at the 8 KB boundary
                raise QATError(f"{what}={pattern!r}: {f} is not UTF-8 text") from None
    return files


def text_split_files(cfg: dict) -> dict[str, list[str]]:
    """data=text: the files of each named split (data.train and data.test required)."""
    files = {split: text_files(f"data.{split}", cfg[split]) for split in ("train", "validation", "test")
             if cfg.get(split)}
    if "train" not in files or "test" not in files:
        raise QATError("data=text needs data.train and data.test (files or globs); data.validation is optional")
    return files


def text_files_corpus(cfg: dict) -> dict[str, list[str]]:
    """data=text: one document per file, read by the `datasets` text builder. Without
    data.validation, the last data.val_chars characters of the training text are held out for it."""
    try:
        import datasets
    except ImportError:
        raise QATError("data=text needs the 'datasets' package") from None
    files = text_split_files(cfg)
    ds = datasets.load_dataset("text", data_files=files, sample_by="document")
    splits = {split: [t for t in ds[split]["text"] if t.strip()] for split in files}
    if "validation" not in splits:
        train = "\n\n".join(splits["train"])
        cut = max(len(train) - int(cfg.get("val_chars", 20000)), len(train) // 2)
        splits["train"], splits["validation"] = [train[:cut]], [train[cut:]]
    return splits
