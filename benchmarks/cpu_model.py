"""Model-level CPU benchmark: a packed export (loaded as users load it: `import qat` +
`AutoModelForCausalLM.from_pretrained`) against the fp32 and bf16 model it came from.

Each variant lives in its own worker process (so that peak memory is its own), all three loaded at
once; the driver asks them in turn, one at a time, so that the VM's speed drift (up to 1.5x within
minutes here) falls on every variant alike: `--repeats` rounds of greedy decode through HF
`generate` (batch 1, KV cache, 32-token prompt of the test text), then rounds of one 512-token
prefill forward, then one perplexity pass over `--windows` test windows each, and the peak
resident memory. Medians of the rounds. Writes benchmarks/results/cpu_model-<cpu>-<AVX2/AVX512>-<date>.json.

  python benchmarks/cpu_model.py --export outputs/.../export [--threads 2] [--new-tokens 64]
"""
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


def load(variant: str, export: str, threads: int):
    torch.set_num_threads(threads)
    model, tokens = test_tokens(export if variant == "packed" else None)
    if variant == "packed":
        from transformers import AutoModelForCausalLM

        import qat  # noqa: F401

        model = AutoModelForCausalLM.from_pretrained(export)
    elif variant == "bf16":
        model = model.bfloat16()
    return model.eval(), tokens


@torch.no_grad()
def worker(variant: str, export: str, threads: int, new_tokens: int, windows: int) -> None:
    """Answers the driver's commands on stdin (decode | prefill | ppl | done), one JSON line each."""
    from qat.eval import perplexity
    from qat.kernels import ops

    model, tokens = load(variant, export, threads)
    prompt, x = tokens[:32].unsqueeze(0), tokens[:512].unsqueeze(0)
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up (kernel build)
    model(x)
    print(json.dumps({"ready": variant}), flush=True)
    for command in sys.stdin:
        command = command.strip()
        t0 = time.perf_counter()
        if command == "decode":
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            out = {"decode_tokens_per_s": new_tokens / (time.perf_counter() - t0)}
        elif command == "prefill":
            model(x)
            out = {"prefill_512_seconds": time.perf_counter() - t0}
        elif command == "ppl":
            ops.kernel_calls(reset=True)
            ppl, _ = perplexity(model, tokens, 512, windows, desc=f"ppl {variant}")
            out = {"ppl": ppl, "ppl_windows": windows, "ppl_seconds": time.perf_counter() - t0,
                   "kernels": ops.kernel_calls()}
        else:
            out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        print(json.dumps(out), flush=True)
        if command == "done":
            return


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--export", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # a worker process
    args = ap.parse_args()
    if args.variant:
        worker(args.variant, args.export, args.threads, args.new_tokens, args.windows)
        return
    variants = ("fp32", "bf16", "packed")
    workers = {}
    for v in variants:  # loaded one after another: a worker is idle (blocked on stdin) once ready
        workers[v] = subprocess.Popen([sys.executable, __file__, "--variant", v, "--export", args.export,
                                       "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
                                       "--windows", str(args.windows)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ask(workers[v], v, None)

    rounds: dict[str, dict[str, list]] = {v: {} for v in variants}
    for command, n in (("decode", args.repeats), ("prefill", args.repeats), ("ppl", 1), ("done", 1)):
        for _ in range(n):
            for v in variants:
                for key, value in ask(workers[v], v, command).items():
                    rounds[v].setdefault(key, []).append(value)
    rows = []
    for v in variants:
        workers[v].wait()
        row = {"variant": v, **{k: statistics.median(x) if isinstance(x[0], float) else x[0] for k, x in rounds[v].items()},
               "decode_rounds": rounds[v]["decode_tokens_per_s"]}
        rows.append(row)
        print(f"{v:>6}: decode {row['decode_tokens_per_s']:.1f} tok/s, prefill(512) {row['prefill_512_seconds']:.2f} s, "
              f"ppl {row['ppl']:.2f} over {args.windows} windows in {row['ppl_seconds']:.1f} s, "
              f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    by = {r["variant"]: r for r in rows}
    ratios = {f"decode_vs_{v}": by["packed"]["decode_tokens_per_s"] / by[v]["decode_tokens_per_s"] for v in ("fp32", "bf16")}
    ratios.update({f"prefill_vs_{v}": by[v]["prefill_512_seconds"] / by["packed"]["prefill_512_seconds"]
                   for v in ("fp32", "bf16")})
    ratios["ppl_pass_vs_fp32"] = by["fp32"]["ppl_seconds"] / by["packed"]["ppl_seconds"]
    print("packed vs fp32 / bf16: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    export = Path(args.export)
    write_result({"benchmark": "cpu_model", "threads": args.threads, "export": str(export), "interleaved": True,
                  "export_bytes": (export / "model.safetensors").stat().st_size, "rows": rows, "ratios": ratios})


def ask(worker: subprocess.Popen, variant: str, command: str | None) -> dict:
    """Send one command (None: wait until loaded) and read its JSON answer."""
    if command is not None:
        worker.stdin.write(command + "\n")
        worker.stdin.flush()
    for line in worker.stdout:
        if line.startswith("{"):
            answer = json.loads(line)
            return {} if "ready" in answer else answer
    raise SystemExit(f"{variant}: the worker exited (code {worker.wait()})")


if __name__ == "__main__":
    main()
