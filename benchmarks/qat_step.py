"""Cost of one QAT training step against a plain fp training step on the same batch.

The embedded default (SmolLM2-135M), batch 2 x 256 tokens, AdamW, on this machine's CPU:
  fp        every parameter trains, nn.Linear weights (the cost of ordinary fine-tuning)
  qat       pbllm_qat r=0.1 (QATLinear: fake quantization in every forward, STE backward),
            with each `train.params` choice
  qat+kd    the same plus the frozen fp teacher's forward and the KL loss (the default recipe)
Median seconds per step over --steps steps after one warm-up step. Writes
benchmarks/results/qat_step-<host>-<date>.json. Not a test: it prints and saves figures.

  python benchmarks/qat_step.py [--steps 4] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bitgemm import commit  # this folder is on sys.path when run as a script

from qat.methods import build_method
from qat.models import load_model
from qat.nn import prepare
from qat.ptq.initializers import initialize
from qat.train.lit import distill_loss, lm_loss, select_trainable


def time_steps(model, batch, steps: int, teacher=None) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        logits = model(batch).logits
        loss = lm_loss(logits, batch)
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(batch).logits
            loss = distill_loss(logits, t_logits, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step allocates the optimizer state
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fp = load_model({"source": "embedded", "name": "smollm2-135m", "dtype": "float32"}).model.train()
    batch = torch.randint(0, fp.config.vocab_size, (args.batch, args.seq_len))
    rows = {"fp": time_steps(fp, batch, args.steps)}
    teacher = copy.deepcopy(fp).eval().requires_grad_(False)
    method = build_method("pbllm_qat", salient_ratio=0.1)
    qat = prepare(fp, method, initialize(fp, method, "rtn", ["lm_head"]).states)
    for which in ("all", "quantized+norms", "quantized"):
        select_trainable(qat, which)
        rows[f"qat[{which}]"] = time_steps(qat, batch, args.steps)
    rows["qat[quantized]+kd"] = time_steps(qat, batch, args.steps, teacher)
    for name, s in rows.items():
        print(f"{name:24s} {s:6.2f} s/step  {s / rows['fp']:.2f}x fp")
    out = {"benchmark": "qat_step", "host": platform.node(), "cpu": platform.processor() or platform.machine(),
           "threads": args.threads, "date": dt.date.today().isoformat(), "commit": commit(),
           "batch": [args.batch, args.seq_len], "seconds_per_step": rows,
           "ratio_to_fp": {k: v / rows["fp"] for k, v in rows.items()}}
    path = Path(__file__).parent / "results" / f"qat_step-cpu{args.threads}-{out['date']}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
