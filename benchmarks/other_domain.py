"""Perplexity of runs' exports on text of another domain than the Wikipedia corpus they were
calibrated and trained on: Python's reference documentation (the stdlib's pydoc_data topics,
~465 KB of technical English, present on every machine). A check that a QAT recipe's gain is
not fitted to one corpus. The fp model is measured on the same windows.

  python benchmarks/other_domain.py outputs/ablation/* [--windows 20]
Writes benchmarks/results/other_domain-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bitgemm import commit  # this folder is on sys.path when run as a script

from qat.eval import perplexity
from qat.export import load_export
from qat.models import load_model
from qat.models.load import encode


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    loaded = load_model({"source": "embedded", "name": "smollm2-135m", "dtype": "float32"})
    tokens = torch.tensor(encode(loaded.tokenizer, pydoc_text()), dtype=torch.int64)
    rows = {"fp": perplexity(loaded.model, tokens, args.seq_len, args.windows, desc="fp")[0]}
    for run in args.runs:
        export = Path(run) / "export"
        if export.is_dir():
            rows[Path(run).name] = perplexity(load_export(export), tokens, args.seq_len, args.windows,
                                              desc=Path(run).name)[0]
    for name, ppl in rows.items():
        print(f"| {name} | {ppl:.1f} | {ppl / rows['fp']:.2f}x |")
    out = {"benchmark": "other_domain", "text": "pydoc_data.topics", "date": dt.date.today().isoformat(),
           "commit": commit(), "windows": args.windows, "seq_len": args.seq_len, "ppl": rows}
    path = Path(__file__).parent / "results" / f"other_domain-{out['date']}.json"
    if path.exists():  # the day's earlier runs on the same windows stay in the file
        before = json.loads(path.read_text())
        if (before.get("windows"), before.get("seq_len")) == (args.windows, args.seq_len):
            out["ppl"] = {**before["ppl"], **rows}
            out["commits"] = sorted({*before.get("commits", [before["commit"]]), out["commit"]})
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
