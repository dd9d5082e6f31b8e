"""Per-layer CPU benchmark: every packed op (through its C++ CPU kernel) against torch.matmul in
fp32 and bf16 on the same input, side by side in one run, medians of several repeats.

Shapes: SmolLM2-135M's MLP (576x1536, 1536x576) and Llama-2-7B's (4096x11008, 11008x4096), as
[out, in]; M = 1 (decode) and M = 512 (prefill). Random weights: speed does not depend on values.
Writes benchmarks/results/cpu_bitgemm-<cpu>-<AVX2/AVX512>-<date>.json (CPU model, flags, ISA path, threads, commit).

  python benchmarks/cpu_bitgemm.py [--threads 2] [--repeats 7] [--shapes 576x1536,...]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bitgemm import commit  # this folder is on sys.path when run as a script

from qat.kernels import ops
from qat.kernels.build import cpu_isa_name, load_cpu_extension
from qat.methods import build_method
from qat.nn.embedding import quantize_matrix
from qat.quant.activations import bit_planes, int4_per_token

RESULTS = Path(__file__).resolve().parent / "results"
# environment variables that force other code paths than this CPU's best: torch's own kernels, oneDNN's
# (its matmuls), the project's CPU kernels
FORCING = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "QAT_CPU_ISA")


def cpu_info() -> dict:
    model, flags = platform.processor(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    keep = [f for f in flags if f.startswith(("avx", "amx", "fma", "popcnt"))]
    return {"model": model, "flags": sorted(keep), "torch_capability": torch.backends.cpu.get_cpu_capability()}


def write_result(result: dict) -> Path:
    """benchmarks/results/<benchmark>-<cpu>-<vector width>-<date>.json, with the date, commit and CPU
    it ran on. The vector width (torch's CPU capability: AVX2, AVX512) is in the name because cloud
    CPUs of different generations share a model name ("AMD EPYC": Zen 3 without AVX-512, Zen 4 with it),
    and so are the paths forced by FORCING's variables (e.g. an AVX2-only CPU emulated on an AVX-512 one)."""
    forced = {k: os.environ[k] for k in FORCING if os.environ.get(k)}
    result = {"date": dt.date.today().isoformat(), "commit": commit(), "cpu": cpu_info(), "forced_paths": forced,
              **result}
    RESULTS.mkdir(exist_ok=True)
    tag = "".join(c if c.isalnum() else "_" for c in result["cpu"]["model"])[:40]
    tag += f"-{result['cpu']['torch_capability']}"
    if result["forced_paths"]:  # another CPU's code paths emulated on this one: not this CPU's own figure
        tag += "-forced_" + "_".join(v.lower() for v in result["forced_paths"].values())
    path = RESULTS / f"{result['benchmark']}-{tag}-{result['date']}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return path


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (and the extension's first call)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def packed_layer(name: str, out_f: int, in_f: int, **params):
    w = torch.randn(out_f, in_f) * 0.02
    method = build_method(name, **params)
    state = method.init_state(w)
    stored = method.pack(state.pop("latent"), state)
    return method, {**stored, **method.derived(stored, in_f)}  # what the kernels read, as PackedLinear hands it


@torch.no_grad()
def bench_shape(out_f: int, in_f: int, m: int, repeats: int) -> dict:
    x = torch.randn(m, in_f)
    w = torch.randn(out_f, in_f) * 0.02
    wb, xb = w.bfloat16(), x.bfloat16()
    row = {"shape": [out_f, in_f], "M": m}
    row["fp32_matmul"] = median_seconds(lambda: torch.matmul(x, w.t()), repeats)
    row["bf16_matmul"] = median_seconds(lambda: torch.matmul(xb, wb.t()), repeats)
    layers = {"binary": ("rtn_binary", {}), "pbllm_r0.1": ("pbllm_qat", {"salient_ratio": 0.1}),
              "dyngroup_g4": ("dyngroup", {"groups": 4})}
    for label, (name, params) in layers.items():
        method, p = packed_layer(name, out_f, in_f, **params)
        # as PackedLinear runs it on a CPU: the method's bound C++ call where it has one, else the op
        call = method.cpu_forward(p, in_f) or (lambda x: method.packed_linear(x, p, in_f))
        row[label] = median_seconds(lambda: call(x), repeats)
        del p
    codes, scale = quantize_matrix(w, 8)
    row["int8_rows"] = median_seconds(lambda: ops.int_row_gemm(x, codes, scale, 8, in_f), repeats)
    # W1A1x4: the bit-serial op on INT4 activations already in planes (the layer's own cost)
    method, p = packed_layer("w11a14", out_f, in_f)
    q, s, z = int4_per_token(x)
    planes = bit_planes(q)
    gb = p["group_planes"][0].contiguous()
    wsum = p["wsum"][:, 0]
    row["w1a1x4"] = median_seconds(lambda: ops.w1a1x4_gemm(planes, p["signs"], gb, p["scales"], wsum, s, z),
                                   repeats)
    row["speedup_vs_fp32"] = {k: row["fp32_matmul"] / row[k] for k in
                              ("binary", "pbllm_r0.1", "dyngroup_g4", "int8_rows", "w1a1x4", "bf16_matmul")}
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--shapes", default="1536x576,576x1536,11008x4096,4096x11008")
    ap.add_argument("--ms", default="1,512")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ext = load_cpu_extension()
    rows = []
    for shape in args.shapes.split(","):
        out_f, in_f = map(int, shape.split("x"))
        for m in map(int, args.ms.split(",")):
            r = bench_shape(out_f, in_f, m, args.repeats)
            rows.append(r)
            sp = r["speedup_vs_fp32"]
            print(f"{out_f}x{in_f} M={m}: fp32 {r['fp32_matmul'] * 1e3:.2f} ms, bf16 {r['bf16_matmul'] * 1e3:.2f} ms | "
                  + ", ".join(f"{k} {r[k] * 1e3:.2f} ms ({sp[k]:.1f}x)" for k in
                              ("binary", "pbllm_r0.1", "dyngroup_g4", "int8_rows", "w1a1x4")), flush=True)
    write_result({"benchmark": "cpu_bitgemm", "isa": cpu_isa_name(ext), "threads": args.threads,
                  "repeats": args.repeats, "max_m_small": ops.CPU_MAX_M_SMALL, "seconds_are": "median per call",
                  "rows": rows})


if __name__ == "__main__":
    main()
