"""Corpus: markup stripping, deterministic disjoint splits; perplexity on a hand case."""
import math

import pytest
import torch

from qat.data.corpora import load_corpus
from qat.data.wiki import split_articles, strip_wiki_markup
from qat.eval import perplexity


def test_strip_wiki_markup_hand_case():
    raw = ("{{Infobox|name=x {{nested}}}}'''Anarchism''' is a [[political philosophy]] that "
           "[[Statelessness|rejects]] hierarchy.<ref>A ref</ref>\n== History ==\n"
           "* item one [http://example.com link text]\n[[File:X.jpg|thumb|a [[caption]]]]\n"
           "{| class=wikitable\n| cell\n|}\nEnd&nbsp;here.<!-- comment -->")
    out = strip_wiki_markup(raw)
    assert out == ("Anarchism is a political philosophy that rejects hierarchy.\nHistory\n"
                   "item one link text\n\n\nEnd here.".replace("\n\n\n", "\n\n"))


def test_splits_are_disjoint_and_deterministic():
    articles = [(f"t{i}", f"text {i} " * 100) for i in range(50)]
    a = split_articles(articles, 5000, 3000)
    b = split_articles(list(reversed(articles)), 5000, 3000)
    assert a == b
    sets = [set(v) for v in a.values()]
    assert sum(map(len, sets)) == 50 and len(set.union(*sets)) == 50
    assert sum(map(len, a["test"])) >= 5000


@pytest.mark.slow
def test_embedded_corpus_splits():
    cfg = {"source": "embedded", "test_chars": 400000, "val_chars": 200000}
    s = load_corpus(cfg)
    assert sum(map(len, s["test"])) >= 300_000
    assert not set(s["test"]) & set(s["train"]) and not set(s["validation"]) & set(s["train"])
    assert len(s["train"]) > 50
    assert s == load_corpus(cfg)


class UniformLM(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return type("Out", (), {"logits": torch.zeros(*x.shape, self.vocab) + self.p})()


class BigramLM(UniformLM):
    """Predicts token (t + 1) % V with probability 1/2, the rest uniform."""

    def forward(self, x):
        logits = torch.full((*x.shape, self.vocab), 0.0)
        logits.scatter_(-1, ((x + 1) % self.vocab).unsqueeze(-1), math.log(self.vocab - 1))
        return type("Out", (), {"logits": logits + self.p})()


def test_perplexity_hand_cases():
    tokens = torch.arange(100) % 10
    ppl, n = perplexity(UniformLM(10), tokens, seq_len=10)
    assert n == 10 * 9 and ppl == pytest.approx(10.0)
    # bigram model: every next token is (t+1)%10 -> p = (V-1)/(2(V-1)) = 1/2 -> ppl 2
    ppl, _ = perplexity(BigramLM(10), tokens, seq_len=10, max_windows=3)
    assert ppl == pytest.approx(2.0, rel=1e-5)


def write_texts(folder):
    from qat.data.corpora import tiny_corpus

    folder.mkdir(parents=True, exist_ok=True)
    docs = [text for _, text in tiny_corpus(n_docs=12)]
    for i, text in enumerate(docs[:8]):
        (folder / f"train{i}.txt").write_text(text)
    (folder / "test.txt").write_text("\n\n".join(docs[8:11]))
    (folder / "other.txt").write_text(docs[11] + " Binary weights are one bit each.")
    return folder


def test_own_text_files_train_and_eval_on_other_text(compose, tmp_path):
    """data=text: train and test from local files (globs); eval.py measures the export on any text."""
    import json
    import os
    import subprocess
    import sys

    from qat.pipeline import run

    texts = write_texts(tmp_path / "texts")
    run_dir = tmp_path / "run"
    cfg = compose(["model=tiny", "data=text", f"data.train={texts}/train*.txt", f"data.test={texts}/test.txt",
                   "data.seq_len=64", "data.val_chars=500", "logger=none", "init=rtn", "smooth=none",
                   "trainer.max_steps=2", "eval.seq_len=64", "eval.max_windows=4", f"hydra.run.dir={run_dir}"])
    res = run(cfg, run_dir)
    assert res["status"] == "ok" and res["eval_tokens"] > 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "eval.py", f"run_dir={run_dir}", "data=text",
                          f"data.train={texts}/train0.txt", f"data.test={texts}/other.txt", "data.seq_len=64",
                          "eval.max_windows=2"], capture_output=True, text=True, cwd=root,
                         env=dict(os.environ, WANDB_MODE="disabled"))
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout[out.stdout.index("{"):])
    assert report["data"] == "text" and report["ppl_packed_export"] != res["ppl"]["final"]
    assert "ppl_final_recorded" not in report  # another text: nothing to compare with


@pytest.mark.parametrize("kind,needle", [("missing", "no such file"), ("empty", "is empty"),
                                         ("binary", "looks binary")])
def test_bad_text_files_are_one_clear_error_before_the_run_folder(kind, needle, compose, tmp_path):
    from qat.errors import QATError
    from qat.pipeline import run

    texts = write_texts(tmp_path / "texts")
    bad = texts / f"{kind}.txt"
    if kind == "empty":
        bad.write_text("")
    elif kind == "binary":
        bad.write_bytes(b"\x00\x01\x02" * 100)
    run_dir = tmp_path / "run"
    cfg = compose(["model=tiny", "data=text", f"data.train={texts}/train*.txt", f"data.test={bad}",
                   "logger=none", "init=rtn", f"hydra.run.dir={run_dir}"])
    with pytest.raises(QATError, match=needle) as e:
        run(cfg, run_dir)
    assert str(e.value).startswith("data.test=")
    assert not run_dir.exists()


def test_hf_datasets_follow_the_wikitext2_protocol_empty_rows_included(tmp_path):
    """GPTQ / PB-LLM / BiLLM evaluate on "\\n\\n".join(test["text"]) with WikiText's empty rows
    kept: data=hf must tokenize exactly that text (dropping empty rows changes every figure)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qat.data.datamodule import tokenize_splits
    from qat.models.tokenizer import ByteTokenizer

    rows = {"train": ["", " = Train = \n", "", " some training text . \n"],
            "validation": ["", " = Val = \n", " more text \n"],
            "test": ["", " = Robert Boulter = \n", "", " Robert Boulter is an English actor . \n", "", ""]}
    for split, text in rows.items():
        pq.write_table(pa.table({"text": text}), tmp_path / f"{split}.parquet")
    cfg = {"source": "hf", "name": "local-wikitext", "path": str(tmp_path), "name_cfg": None, "text_field": "text",
           "splits": {"train": "train", "validation": "validation", "test": "test"}}
    tokens = tokenize_splits(cfg, ByteTokenizer(), "bytes")
    assert tokens["test"].tolist() == list("\n\n".join(rows["test"]).encode())


def test_generated_samples_are_spread_evenly_and_resumable():
    from qat.data.datamodule import StepIndexedBlocks
    from qat.data.generated import generated_count, is_generated

    f = 0.25
    flags = [is_generated(g, f) for g in range(40)]
    assert [i for gen, i in flags if gen] == list(range(10)) and generated_count(40, f) == 10
    assert [i for gen, i in flags if not gen] == list(range(30))  # the corpus stream, without gaps
    assert all(sum(gen for gen, _ in flags[k:k + 4]) == 1 for k in range(0, 40, 4))  # every stretch its share
    corpus, generated = torch.arange(50 * 8).view(50, 8), -1 - torch.arange(10 * 8).view(10, 8)
    full = StepIndexedBlocks(corpus, 3, 0, 40, generated, f)
    resumed = StepIndexedBlocks(corpus, 3, 17, 23, generated, f)  # a run resumed at sample 17
    assert all(torch.equal(full[17 + j][0], resumed[j][0]) for j in range(23))
    rows = [full[j][0] for j in range(40)]
    assert sum(bool((r < 0).all()) for r in rows) == 10 and len({tuple(r.tolist()) for r in rows}) == 40
    plain = StepIndexedBlocks(corpus, 3, 0, 30)  # the corpus samples are the stream a plain run reads
    assert all(torch.equal(r, plain[i][0]) for r, (gen, i) in zip(rows, flags) if not gen)


def test_generated_text_joins_the_training_batches_and_is_cached(compose, tmp_path, monkeypatch):
    from qat.data import LMDataModule
    from qat.errors import QATError
    from qat.pipeline import run

    monkeypatch.setenv("QAT_CACHE", str(tmp_path / "cache"))
    common = ["model=tiny", "data=tiny", "logger=none", "init=rtn", "smooth=none", "method=pbllm_qat",
              "trainer.max_steps=2", "eval.seq_len=64", "eval.max_windows=2"]
    run_dir = tmp_path / "run"
    seen = []  # what the training loader hands the trainer
    original = LMDataModule.train_dataloader
    monkeypatch.setattr(LMDataModule, "train_dataloader",
                        lambda self: seen.append(self) or original(self))
    res = run(compose(common + ["data.generated_fraction=0.5", f"hydra.run.dir={run_dir}"]), run_dir)
    assert res["status"] == "ok" and res["generated_text"]["sequences"] == 2  # 2 steps x 2 samples x 0.5
    cached = list((tmp_path / "cache" / "generated").glob("*.pt"))
    pool = torch.load(cached[0], weights_only=True)
    assert len(cached) == 1 and pool.shape == (2, 64)
    seen[0].trainer = None  # the loader from the run's start (a trainer's global step would resume past it)
    batches = [b[0] for b in original(seen[0])]  # every batch of the run: one corpus row and one generated
    assert len(batches) == 2 and all(torch.equal(b[1], pool[i]) for i, b in enumerate(batches))
    assert not any(torch.equal(b[0], p) for b in batches for p in pool)
    # a second run reads the pool from the cache: nothing is sampled again
    monkeypatch.setattr("qat.data.generated.sample_sequences", lambda *a, **k: pytest.fail("sampled again"))
    again = run(compose(common + ["data.generated_fraction=0.5", f"hydra.run.dir={tmp_path / 'again'}"]),
                tmp_path / "again")
    assert again["ppl"]["final"] == res["ppl"]["final"]
    for bad in ("data.generated_fraction=1.0", "data.generated_fraction=-0.1", "data.generated_fraction=half",
                "data.generated_batch=0"):
        folder = tmp_path / bad.split("=")[1]
        with pytest.raises(QATError, match=bad.split("=")[0].replace(".", r"\.") + "=.*must be"):
            run(compose(common + [bad, f"hydra.run.dir={folder}"]), folder)
        assert not folder.exists()
