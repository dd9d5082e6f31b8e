"""Model-level CPU benchmark: a packed export (loaded as users load it: `import qat` +
`AutoModelForCausalLM.from_pretrained`) against the fp32 and bf16 model it came from.

Per variant, each in its own process (so that peak memory is its own): greedy decode tokens/s
through HF `generate` (batch 1, KV cache, 32-token prompt of the test text), the seconds of one
512-token prefill forward, the seconds of the perplexity pass over `--windows` test windows, and
the peak resident memory. Medians of `--repeats`. Writes benchmarks/results/cpu_model-<cpu>-<date>.json.

  python benchmarks/cpu_model.py --export outputs/.../export [--threads 2] [--new-tokens 64]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cpu_bitgemm import write_result  # this folder is on sys.path when run as a script


def test_tokens(export: str | None = None):
    """The embedded default's test split, as conf/ defines it, and the fp model (None when an export
    is given: its own tokenizer is used, so that the fp model never counts in its peak memory)."""
    from omegaconf import OmegaConf

    from qat.data import LMDataModule
    from qat.models import load_model

    conf = Path(__file__).resolve().parents[1] / "conf"
    model_cfg = OmegaConf.to_container(OmegaConf.load(conf / "model" / "embedded.yaml"))
    data_cfg = dict(OmegaConf.to_container(OmegaConf.load(conf / "data" / "embedded.yaml")), total_batches=0)
    if export:
        from transformers import AutoTokenizer

        return None, LMDataModule(data_cfg, AutoTokenizer.from_pretrained(export), model_cfg["name"]).test_tokens
    loaded = load_model(model_cfg)
    return loaded.model, LMDataModule(data_cfg, loaded.tokenizer, loaded.name).test_tokens


@torch.no_grad()
def measure(variant: str, export: str | None, threads: int, new_tokens: int, windows: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    model, tokens = test_tokens(export if variant == "packed" else None)
    if variant == "packed":
        from transformers import AutoModelForCausalLM

        import qat  # noqa: F401

        model = AutoModelForCausalLM.from_pretrained(export)
    elif variant == "bf16":
        model = model.bfloat16()
    model.eval()
    from qat.eval import perplexity
    from qat.kernels import ops

    prompt = tokens[:32].unsqueeze(0)
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up (kernel build)
    decode = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        decode.append(new_tokens / (time.perf_counter() - t0))
    x = tokens[:512].unsqueeze(0)
    model(x)
    prefill = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        prefill.append(time.perf_counter() - t0)
    ops.kernel_calls(reset=True)
    t0 = time.perf_counter()
    ppl, _ = perplexity(model, tokens, 512, windows, desc=f"ppl {variant}")
    ppl_seconds = time.perf_counter() - t0
    return {"variant": variant, "decode_tokens_per_s": statistics.median(decode),
            "prefill_512_seconds": statistics.median(prefill), "ppl": ppl, "ppl_windows": windows,
            "ppl_seconds": ppl_seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "kernels": ops.kernel_calls()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--export", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.export, args.threads, args.new_tokens, args.windows, args.repeats)))
        return
    rows = []
    for variant in ("fp32", "bf16", "packed"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--export", args.export,
                              "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
                              "--windows", str(args.windows), "--repeats", str(args.repeats)],
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{variant}: {out.stderr.strip().splitlines()[-1]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{variant:>6}: decode {row['decode_tokens_per_s']:.1f} tok/s, prefill(512) {row['prefill_512_seconds']:.2f} s, "
              f"ppl {row['ppl']:.2f} over {args.windows} windows in {row['ppl_seconds']:.1f} s, "
              f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    by = {r["variant"]: r for r in rows}
    ratios = {f"decode_vs_{v}": by["packed"]["decode_tokens_per_s"] / by[v]["decode_tokens_per_s"] for v in ("fp32", "bf16")}
    ratios.update({f"prefill_vs_{v}": by[v]["prefill_512_seconds"] / by["packed"]["prefill_512_seconds"]
                   for v in ("fp32", "bf16")})
    ratios["ppl_pass_vs_fp32"] = by["fp32"]["ppl_seconds"] / by["packed"]["ppl_seconds"]
    print("packed vs fp32 / bf16: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    export = Path(args.export)
    write_result({"benchmark": "cpu_model", "threads": args.threads, "export": str(export),
                  "export_bytes": (export / "model.safetensors").stat().st_size, "rows": rows, "ratios": ratios})


if __name__ == "__main__":
    main()
