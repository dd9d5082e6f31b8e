"""Layer-level benchmark of the packed kernels against fp16 torch.matmul and bitsandbytes NF4.

Llama-2-7B and -70B linear shapes (K = in, N = out), M tokens in {1, 16, 128, 1024}.
Each figure is the median over CUDA-graph replays of R calls that rotate over enough weight
copies to keep the working set well above L2, so HBM is what is measured.
Writes benchmarks/results/bitgemm-<device>-<date>.json and prints a table.

  python benchmarks/bitgemm.py [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qat.kernels import ops
from qat.kernels.build import load_extension
from qat.quant.activations import bit_planes, int4_per_token
from qat.quant.packing import pack_bits

SHAPES = {  # name: (K, N)
    "7b.qkvo": (4096, 4096), "7b.gate_up": (4096, 11008), "7b.down": (11008, 4096),
    "70b.qo": (8192, 8192), "70b.kv": (8192, 1024), "70b.gate_up": (8192, 28672),
    "70b.down": (28672, 8192),
}
MS = [1, 16, 128, 1024]
KERNEL_SETTINGS = {  # M = 1 kernels timed raw: sign-flip with R rows per warp, lookup table with S K-splits
    "R1": dict(algo=1, rows_per_warp=1), "R2": dict(algo=1, rows_per_warp=2), "R4": dict(algo=1, rows_per_warp=4),
    "lut_S4": dict(algo=2, lut_splits=4), "lut_S8": dict(algo=2, lut_splits=8),
}
SMALL_MS = [2, 4, 8]  # decode batches: GEMV vs dequantize + cuBLAS, to place the crossover
L2_FLUSH_BYTES = 256 * 2**20


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def time_calls(fns: list, reps: int = 15) -> float:
    """Median microseconds per call: a CUDA graph runs every fn once; replayed `reps` times."""
    for f in fns:  # warm-up (and lazy init) outside the graph
        f()
    torch.cuda.synchronize()
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for f in fns:
                f()
        run = graph.replay
    except Exception as e:  # not capturable: time eager launches (launch gaps included)
        print(f"  (graph capture failed: {type(e).__name__}; timing eager)", file=sys.stderr)
        torch.cuda.synchronize()

        def run():
            for f in fns:
                f()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(fns))
    return statistics.median(times)


def random_binary(n, k, ratio, device, gen):
    """A packed PB-LLM layer (bitmap salient positions) of random content, on `device`."""
    signs_b = torch.rand(n, k, generator=gen, device=device) < 0.5
    scales = (torch.rand(n, 1, generator=gen, device=device) * 0.02 + 0.01).half()
    p = {"signs": None, "scales": scales, "fmt": 0, "row_ptr": None, "positions": None,
         "codes": None, "sal_scale": None, "sal_zero": None}
    if ratio > 0:
        mask = torch.rand(n, k, generator=gen, device=device) < ratio
        nnz = int(mask.sum())
        row_ptr = torch.zeros(n + 1, dtype=torch.int32, device=device)
        row_ptr[1:] = torch.cumsum(mask.sum(1), 0)
        p.update(fmt=2, row_ptr=row_ptr, positions=pack_bits(mask),
                 codes=torch.randint(0, 256, (nnz,), device=device, dtype=torch.uint8),
                 sal_scale=torch.full((n,), 1e-3, device=device).half(),
                 sal_zero=torch.full((n,), 128.0, device=device).half())
        signs_b |= mask
    p["signs"] = pack_bits(signs_b)
    return p


def packed_bytes(p) -> int:
    return sum(v.numel() * v.element_size() for v in p.values() if isinstance(v, torch.Tensor))


def bench_shape(name, k, n, ms, ext, bnb, gen):
    dev = "cuda"
    rows = []
    fp16_bytes = n * k * 2
    copies = lambda nbytes: max(2, min(64, L2_FLUSH_BYTES // max(nbytes, 1) + 1))
    w16 = [torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02 for _ in range(copies(fp16_bytes))]
    binaries = {r: [random_binary(n, k, r, dev, gen)] for r in (0.0, 0.1)}
    for r in binaries:
        c = copies(packed_bytes(binaries[r][0]))
        binaries[r] += [random_binary(n, k, r, dev, gen) for _ in range(c - 1)]
    nf4 = []
    if bnb is not None:
        for w in w16[: copies(n * k // 2)]:
            q, st = bnb.functional.quantize_4bit(w, quant_type="nf4")
            nf4.append((q, st))
    # W1A1x4: packed signs for every weight, one scale per row, planes of the activations
    w1 = [(p["signs"], torch.cat([p["scales"], p["scales"]], 1), torch.randn(n, device=dev))
          for p in binaries[0.0]]
    empty = torch.empty(0, dtype=torch.int32, device=dev)
    for m in ms:
        x = torch.randn(m, k, device=dev, dtype=torch.float16)
        ref_y = torch.empty(m, n, device=dev, dtype=torch.float16)
        t16 = time_calls([lambda w=w: torch.matmul(x, w.t(), out=ref_y) for w in w16])
        rec = {"shape": name, "K": k, "N": n, "M": m, "fp16_us": t16}
        for r, plist in binaries.items():
            tag = "binary" if r == 0 else f"pbllm_r{r}"
            t = time_calls([lambda p=p: ops.binary_gemm(x, p["signs"], p["scales"], k, p["fmt"],
                                                        p["row_ptr"], p["positions"], p["codes"],
                                                        p["sal_scale"], p["sal_zero"]) for p in plist])
            nbytes = packed_bytes(plist[0])
            rec[f"{tag}_us"] = t
            rec[f"{tag}_bytes"] = nbytes
            rec[f"{tag}_GBps"] = nbytes / t / 1e3 if m == 1 else None
            rec[f"{tag}_speedup_vs_fp16"] = t16 / t
        if nf4:
            tq = time_calls([lambda q=q, st=st: bnb.matmul_4bit(x, q.t(), quant_state=st) for q, st in nf4])
            rec["nf4_us"] = tq
            rec["binary_speedup_vs_nf4"] = tq / rec["binary_us"]
        if m == 1:  # the raw kernels, each setting (no op overhead): sign-flip R rows/warp, lookup table S splits
            for setting, kw in KERNEL_SETTINGS.items():
                for r, plist in binaries.items():
                    tag = "binary" if r == 0 else f"pbllm_r{r}"
                    t = time_calls([
                        lambda p=p: ext.binary_gemv(x, p["signs"], p["scales"], p["signs"].shape[1],
                                                    p["fmt"], *[p[k] if p[k] is not None else empty for k in
                                                                ("row_ptr", "positions", "codes", "sal_scale", "sal_zero")],
                                                    **kw) for p in plist])
                    rec[f"{tag}_kernel_{setting}_us"] = t
                    rec[f"{tag}_kernel_{setting}_speedup_vs_fp16"] = t16 / t
                    rec[f"{tag}_kernel_{setting}_GBps"] = packed_bytes(plist[0]) / t / 1e3
            print("    raw kernel us: " + ", ".join(f"{k[:-3]}={v:.1f}" for k, v in rec.items()
                                                   if "_kernel_" in k and k.endswith("_us")))
        if 1 < m <= 16:  # decode batch: the GEMV path vs dequantize + cuBLAS
            p = binaries[0.0][0]
            w = ext.binary_dequant(p["signs"], p["scales"], p["signs"].shape[1], 0, empty, empty, empty, empty, empty)
            rec["binary_dequant_matmul_us"] = time_calls([lambda p=p: torch.matmul(
                x, ext.binary_dequant(p["signs"], p["scales"], p["signs"].shape[1], 0, empty, empty, empty,
                                      empty, empty).t()) for p in binaries[0.0]])
            del w
            sal = [empty] * 5
            rec["binary_gemv_us"] = time_calls([lambda p=p: torch.cat([
                ops._gemv(ext, x[i: i + ops.GEMV_TILE_M], p["signs"], p["scales"], k, p["signs"].shape[1], 0, sal)
                for i in range(0, m, ops.GEMV_TILE_M)]) for p in binaries[0.0]])
            print(f"    M={m}: gemv {rec['binary_gemv_us']:.1f}us, dequant+matmul {rec['binary_dequant_matmul_us']:.1f}us")
        q, s, z = int4_per_token(x)
        planes = bit_planes(q)
        rec["w1a1x4_us"] = time_calls([lambda w=w: ops.w1a1x4_gemm(planes, w[0], empty, w[1], w[2], s, z) for w in w1])
        rows.append(rec)
        print(f"{name:12s} M={m:5d} fp16 {t16:9.1f}us  bin {rec['binary_us']:8.1f}us "
              f"({rec['binary_speedup_vs_fp16']:5.1f}x"
              + (f", {rec['binary_GBps']:6.0f} GB/s" if rec['binary_GBps'] else "")
              + f")  pb0.1 {rec['pbllm_r0.1_us']:8.1f}us ({rec['pbllm_r0.1_speedup_vs_fp16']:4.1f}x)"
              + (f"  nf4 {rec['nf4_us']:8.1f}us (bin {rec['binary_speedup_vs_nf4']:4.1f}x)" if nf4 else "")
              + f"  w1a1x4 {rec['w1a1x4_us']:8.1f}us", flush=True)
    del w16, binaries, nf4
    torch.cuda.empty_cache()
    return rows


def target_summary(rows: list[dict], bw: float) -> list[dict]:
    """Issue #5's M = 1 targets, per shape, for the fastest raw kernel setting of each weight kind."""
    out = []
    for r in (r for r in rows if r["M"] == 1):
        rec = {"shape": r["shape"]}
        for tag in ("binary", "pbllm_r0.1"):
            times = {k[len(tag) + 8:-3]: v for k, v in r.items() if k.startswith(f"{tag}_kernel_") and k.endswith("_us")}
            if not times:
                continue
            best = min(times, key=times.get)
            rec[f"{tag}_best_kernel"] = best
            rec[f"{tag}_best_speedup_vs_fp16"] = r["fp16_us"] / times[best]
            rec[f"{tag}_best_bw_fraction"] = r[f"{tag}_bytes"] / times[best] / 1e3 / bw
        if "nf4_us" in r and "binary_best_kernel" in rec:
            rec["binary_best_speedup_vs_nf4"] = r["nf4_us"] / r[f"binary_kernel_{rec['binary_best_kernel']}_us"]
        out.append(rec)
        print(f"  target check {r['shape']:12s} " + "  ".join(
            f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items() if k != "shape"))
    print("  targets (M = 1): binary >= 8x fp16, >= 1.5x NF4, >= 70% bandwidth; PB-LLM r=0.1 >= 3x fp16")
    return out


def copy_bandwidth() -> float:
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = time_calls([lambda: b.copy_(a)], reps=10)
    return 2 * a.numel() / t / 1e3  # GB/s, read + write


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="7B shapes, M in {1, 16} only")
    ap.add_argument("--small-m", action="store_true", help="also M in {2, 4, 8}")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/bitgemm.py needs a CUDA device")
    ext = load_extension()
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
        print("bitsandbytes not installed: NF4 column left out", file=sys.stderr)
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = {k: v for k, v in SHAPES.items() if not args.quick or k.startswith("7b")}
    ms = [1, 16] if args.quick else MS
    if args.small_m:
        ms = sorted(set(ms + SMALL_MS))
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}: copy bandwidth {bw:.0f} GB/s (read+write)")
    rows = []
    for name, (k, n) in shapes.items():
        rows += bench_shape(name, k, n, ms, ext, bnb, gen)
    for r in rows:
        for key in [k for k in r if k.endswith("GBps") and r[k]]:
            r[key[:-4] + "bw_fraction"] = r[key] / bw
    targets = target_summary(rows, bw)
    result = {
        "benchmark": "bitgemm", "device": torch.cuda.get_device_name(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": os.environ.get("QAT_COMMIT", commit()), "torch": torch.__version__,
        "bitsandbytes": getattr(bnb, "__version__", None), "host": platform.node(),
        "copy_bandwidth_GBps": bw, "method": "median of 15 CUDA-graph replays, rotating weight copies",
        "targets": targets, "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name().replace(" ", "_")
    path = out / f"bitgemm-{dev}-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
