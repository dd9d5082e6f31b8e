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


def run_kind(r: dict) -> str:
    """QAT when the run trained (train_tokens > 0), else PTQ: different budgets, different fronts."""
    return "QAT" if (r.get("train_tokens") or 0) > 0 else "PTQ"


MARKERS = {"PTQ": "o", "QAT": "^"}
FRONT_STYLE = {"PTQ": ":", "QAT": "-"}
LABEL_OFFSETS = [(6, 6), (6, -12), (-6, 6), (-6, -12), (6, 18), (6, -24)]  # points; tried in turn


def draw_pareto(ax, rows: list[dict]) -> list[tuple[str, tuple[float, float, float, float]]]:
    """Final perplexity (log) against storage bits: one colour per method, one marker per kind
    (PTQ o, QAT ^), a Pareto front per kind, labels on the front points only, each placed where
    it overlaps no other label (or left out). Returns the labels drawn and their display boxes."""
    done = [r for r in rows if r.get("status", "ok") == "ok" and r.get("bits") and r["ppl"].get("final")]
    colours = {m: f"C{i}" for i, m in enumerate(sorted({r["method"] for r in done}))}
    for (method, kind) in sorted({(r["method"], run_kind(r)) for r in done}):
        pts = [r for r in done if r["method"] == method and run_kind(r) == kind]
        ax.scatter([r["bits"]["storage"] for r in pts], [r["ppl"]["final"] for r in pts], c=colours[method],
                   marker=MARKERS[kind], s=28, label=f"{method} ({kind})")
    ax.set_yscale("log")
    fronts = {}
    for kind in ("PTQ", "QAT"):
        pts = [r for r in done if run_kind(r) == kind]
        front = pareto_front([(r["bits"]["storage"], r["ppl"]["final"]) for r in pts])
        if front:
            ax.plot([b for b, _ in front], [p for _, p in front], "k", ls=FRONT_STYLE[kind], lw=0.8,
                    label=f"{kind} Pareto front")
        fronts[kind] = [next(r for r in pts if (r["bits"]["storage"], r["ppl"]["final"]) == f) for f in front]
    if done:
        ax.axhline(done[0]["ppl"]["fp"], color="grey", ls="--", lw=0.8, label="fp")
    ax.set_xlabel("storage bits per quantized weight (packed tensors)")
    ax.set_ylabel("test perplexity (log)")
    ax.legend(fontsize=7)
    renderer = ax.figure.canvas.get_renderer()
    placed: list[tuple[str, tuple[float, float, float, float]]] = []
    for r in fronts["QAT"] + fronts["PTQ"]:
        for offset in LABEL_OFFSETS:
            text = ax.annotate(r["run"], (r["bits"]["storage"], r["ppl"]["final"]), xytext=offset,
                               textcoords="offset points", fontsize=6,
                               ha="left" if offset[0] > 0 else "right")
            box = text.get_window_extent(renderer)
            if not any(box.overlaps(other) for _, other in placed) and _inside(box, ax, renderer):
                placed.append((r["run"], box))
                break
            text.remove()
    return [(name, tuple(box.bounds)) for name, box in placed]


def _inside(box, ax, renderer) -> bool:
    area = ax.get_window_extent(renderer)
    return area.x0 <= box.x0 and box.x1 <= area.x1 and area.y0 <= box.y0 and box.y1 <= area.y1


def plot_pareto(rows: list[dict], path: str) -> list[tuple[str, tuple[float, float, float, float]]]:
    """draw_pareto into a PNG at `path` (matplotlib, headless). Returns the labels drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[notebooks]'") from None
    fig, ax = plt.subplots(figsize=(8, 5))
    labels = draw_pareto(ax, rows)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return labels


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
