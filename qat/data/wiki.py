"""The embedded default corpus: English Wikipedia articles from a fixture in the gensim wheel.

The wiki markup is stripped here (no gensim import). Articles are split deterministically by
a hash of their title into train / validation / test; test is never used for calibration or
training.
"""
from __future__ import annotations

import bz2
import hashlib
import html
import re
import xml.etree.ElementTree as ET

from qat.fetch import cache_dir, fetch_from_wheel

GENSIM_WHEEL = "gensim==4.4.0"
ENWIKI_MEMBER = ("gensim/test/test_data/"
                 "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
ENWIKI_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
MIN_ARTICLE_CHARS = 2000  # shorter pages are stubs

_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
_TAG_BLOCK = re.compile(r"<(math|gallery|timeline|source|syntaxhighlight|score)[^>]*>.*?</\1>",
                        re.DOTALL | re.IGNORECASE)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category|Media):", re.IGNORECASE)
_LINK = re.compile(r"\[\[([^\[\]|]*\|)?([^\[\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.MULTILINE)
_LIST = re.compile(r"^[*#:;]+\s*", re.MULTILINE)
_QUOTES = re.compile(r"'{2,}")
_BLANKS = re.compile(r"\n{3,}")


def _drop_nested(text: str, open_: str, close: str) -> str:
    """Remove balanced open_ ... close spans (templates {{ }}, tables {| |})."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if depth == 0:
                out.append(text[i])
            i += 1
    return "".join(out)


def _drop_file_links(text: str) -> str:
    """[[File:...]] may nest links in its caption: drop the whole balanced span."""
    while (m := _FILE_LINK.search(text)) is not None:
        depth, i = 0, m.start()
        while i < len(text):
            if text.startswith("[[", i):
                depth += 1
                i += 2
            elif text.startswith("]]", i):
                depth -= 1
                i += 2
                if depth == 0:
                    break
            else:
                i += 1
        text = text[: m.start()] + text[i:]
    return text


def strip_wiki_markup(text: str) -> str:
    text = html.unescape(text)  # the XML dump escapes once; entities like &nbsp; remain
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _TAG_BLOCK.sub("", text)
    text = _drop_nested(text, "{{", "}}")
    text = _drop_nested(text, "{|", "|}")
    text = _drop_file_links(text)
    text = _LINK.sub(lambda m: m.group(2), text)
    text = _EXT_LINK.sub(lambda m: m.group(1), text)
    text = _TAG.sub("", text)
    text = _HEADING.sub(lambda m: m.group(1), text)
    text = _LIST.sub("", text)
    text = _QUOTES.sub("", text)
    text = html.unescape(text).replace("\xa0", " ")
    lines = [ln.strip() for ln in text.splitlines()]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def parse_articles(xml_text: str) -> list[tuple[str, str]]:
    """(title, plain text) of each main-namespace, non-redirect page of a MediaWiki dump."""
    root = ET.fromstring(xml_text)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    articles = []
    for page in root.iter(f"{ns}page"):
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        raw = page.findtext(f"{ns}revision/{ns}text") or ""
        if raw.lstrip().lower().startswith("#redirect"):
            continue
        text = strip_wiki_markup(raw)
        if len(text) >= MIN_ARTICLE_CHARS:
            articles.append((page.findtext(f"{ns}title") or "", text))
    return articles


def split_articles(articles: list[tuple[str, str]], test_chars: int, val_chars: int) -> dict[str, list[str]]:
    """Deterministic split by sha1(title): test first until test_chars, then validation."""
    order = sorted(articles, key=lambda a: hashlib.sha1(a[0].encode()).hexdigest())
    splits: dict[str, list[str]] = {"test": [], "validation": [], "train": []}
    sizes = {"test": 0, "validation": 0}
    for _title, text in order:
        name = ("test" if sizes["test"] < test_chars
                else "validation" if sizes["validation"] < val_chars else "train")
        splits[name].append(text)
        if name in sizes:
            sizes[name] += len(text)
    return splits


def embedded_wiki_articles() -> list[tuple[str, str]]:
    path = fetch_from_wheel(GENSIM_WHEEL, ENWIKI_MEMBER, ENWIKI_SHA256,
                            cache_dir() / "downloads" / "enwiki-shortened.xml.bz2")
    return parse_articles(bz2.decompress(path.read_bytes()).decode("utf-8"))
