"""A markdown table of runs from their results.json files.

  python -m qat.eval.report outputs/sweep/* outputs/ptq/* multirun/2026-11-24
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def load_results(paths: list[str]) -> list[dict]:
    """The results.json of every run under `paths` (run folders, sweep folders searched
    recursively, or results.json files); other files (multirun.yaml, logs) are skipped."""
    rows = []
    for p in map(Path, paths):
        found = sorted(p.rglob("results.json")) if p.is_dir() else [p] if p.name == "results.json" else []
        for f in found:
            try:
                r = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                print(f"skipped {f}: not readable JSON", file=sys.stderr)
                continue
            r["run"] = f.parent.name if f.parent == p or not p.is_dir() else str(f.parent.relative_to(p))
            rows.append(r)
    return rows


def num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.0f}"


def markdown_table(rows: list[dict]) -> str:
    head = ("| run | method | init | r | ppl fp | ppl init | ppl final | bits weight | bits storage "
            "| train tokens | calib s | recon s | train s | total s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        p, b, s = r["ppl"], r.get("bits", {}), r["seconds"]
        ratio = "-" if r.get("salient_ratio") is None else f"{r['salient_ratio']:g}"
        final = num(p.get("final"), 1) if r.get("status", "ok") == "ok" else r["status"]
        lines.append(f"| {r['run']} | {r['method']} | {r['init']} | {ratio} | {num(p['fp'], 2)} | {num(p['init'], 1)} "
                     f"| {final} | {num(b.get('weight'), 3)} | {num(b.get('storage'), 3)} "
                     f"| {r.get('train_tokens', '-')} | {s['calibrate']:.0f} | {s.get('reconstruct', 0):.0f} "
                     f"| {s['train']:.0f} | {fmt(s.get('total'))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table(load_results(sys.argv[1:])))
