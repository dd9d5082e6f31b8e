"""A markdown table of runs from their results.json files, and the perplexity-vs-storage-bits
Pareto plot (`--plot out.png`, needs matplotlib: pip install -e '.[notebooks]').

  python -m qat.eval.report outputs/sweep/* outputs/ptq/* multirun/2026-11-24 [--plot pareto.png]
  make report RUNS="outputs/ablation multirun/2026-11-24" [PLOT=pareto.png]
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


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (bits, ppl) points no other point beats on both: fewer or equal bits and lower ppl."""
    front, best = [], float("inf")
    for bits, ppl in sorted(points):
        if ppl < best:
            front.append((bits, ppl))
            best = ppl
    return front


def plot_pareto(rows: list[dict], path: str) -> None:
    """Final perplexity (log) against storage bits per weight, one labelled point per run, the
    Pareto front as a line, fp as a dashed level."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[notebooks]'") from None
    done = [r for r in rows if r.get("status", "ok") == "ok" and r.get("bits") and r["ppl"].get("final")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in sorted({r["method"] for r in done}):
        pts = [(r["bits"]["storage"], r["ppl"]["final"], r["run"]) for r in done if r["method"] == method]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=method)
        for b, p, name in pts:
            ax.annotate(name, (b, p), fontsize=6, alpha=0.7)
    front = pareto_front([(r["bits"]["storage"], r["ppl"]["final"]) for r in done])
    ax.plot([b for b, _ in front], [p for _, p in front], "k--", lw=0.8, label="Pareto front")
    if done:
        ax.axhline(done[0]["ppl"]["fp"], color="grey", ls=":", label="fp")
    ax.set_xlabel("storage bits per quantized weight (packed tensors)")
    ax.set_ylabel("test perplexity (log)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    args = sys.argv[1:]
    plot = None
    if "--plot" in args:
        i = args.index("--plot")
        plot = args[i + 1]
        args = args[:i] + args[i + 2:]
    rows = load_results(args)
    print(markdown_table(rows))
    if plot:
        plot_pareto(rows, plot)
        print(f"wrote {plot}", file=sys.stderr)
