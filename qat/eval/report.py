"""A markdown table of runs from their results.json files.

  python -m qat.eval.report outputs/sweep/* outputs/ptq/*
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def load_results(paths: list[str]) -> list[dict]:
    rows = []
    for p in paths:
        f = Path(p) / "results.json" if Path(p).is_dir() else Path(p)
        if f.exists():
            r = json.loads(f.read_text())
            r["run"] = f.parent.name
            rows.append(r)
    return rows


def fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.0f}"


def markdown_table(rows: list[dict]) -> str:
    head = ("| run | method | init | r | ppl fp | ppl init | ppl final | bits weight | bits storage "
            "| train tokens | calib s | recon s | train s | total s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        p, b, s = r["ppl"], r["bits"], r["seconds"]
        ratio = "-" if r.get("salient_ratio") is None else f"{r['salient_ratio']:g}"
        lines.append(f"| {r['run']} | {r['method']} | {r['init']} | {ratio} | {p['fp']:.2f} | {p['init']:.1f} "
                     f"| {p['final']:.1f} | {b['weight']:.3f} | {b['storage']:.3f} | {r['train_tokens']} "
                     f"| {s['calibrate']:.0f} | {s.get('reconstruct', 0):.0f} | {s['train']:.0f} "
                     f"| {fmt(s.get('total'))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table(load_results(sys.argv[1:])))
