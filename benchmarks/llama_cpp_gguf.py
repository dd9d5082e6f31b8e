"""The GGUF export in the real llama.cpp (llama-cpp-python, 2 threads), side by side in one run:
trained runs' model.gguf against the fp model written by the same exporter as F16, Q8_0 and Q4_0.

Each run's GGUF is written again here by the same exporter as export.gguf=true (a run need not
have set it). Per file: size, bits per weight of the whole file, llama.cpp's perplexity on the same test windows
as the run's packed perplexity (results.json ppl.final; the fp model's: ppl.fp), prefill tokens/s of
one 512-token prompt and decode tokens/s of 64 greedy tokens (medians of --repeats). Writes
benchmarks/results/llama_cpp_gguf-<cpu>-<AVX2/AVX512>-<date>.json and prints a markdown table.

  python benchmarks/llama_cpp_gguf.py --run q1_0=outputs/<experiment=q1_0 run> --run gptq4=outputs/<gptq run>
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_bitgemm import write_result  # noqa: E402  (this folder is on sys.path when run as a script)
from cpu_model import test_tokens  # noqa: E402


def measure(name: str, gguf: Path, packed_ppl: float | None, tokens, args) -> dict:
    from qat.eval import llama_cpp

    ppl, _ = llama_cpp.perplexity(gguf, tokens, args.seq_len, args.windows, threads=args.threads)
    speed = llama_cpp.speed(gguf, tokens[:512].tolist(), n_decode=64, threads=args.threads, repeats=args.repeats)
    row = {"name": name, "file_mb": gguf.stat().st_size / 1e6, "ppl_llama_cpp": ppl, "ppl_packed": packed_ppl,
           "ppl_rel_diff": None if packed_ppl is None else ppl / packed_ppl - 1, **speed}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR of a trained run (repeatable)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from qat.export.gguf import type_shares, write_gguf
    from qat.models.load import embedded_cache_path

    _, tokens = test_tokens(str(embedded_cache_path()))
    rows, fp_ppl = [], None
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for spec in args.run:
            name, run = spec.split("=", 1)
            results = json.loads((Path(run) / "results.json").read_text())
            fp_ppl = results["ppl"]["fp"]
            report = write_gguf(Path(run), Path(tmp) / f"{name}.gguf")  # the same exporter as export.gguf=true
            files.append((name, Path(report["file"]), results["ppl"]["final"], report))
        for ftype in ("f16", "q8_0", "q4_0"):
            report = write_gguf(embedded_cache_path(), Path(tmp) / f"fp-{ftype}.gguf", float_type=ftype)
            files.append((f"fp {ftype.upper()}", Path(report["file"]), fp_ppl, report))
        for name, gguf, packed, report in files:
            row = measure(name, gguf, packed, tokens, args)
            row.update(bits_per_weight=report["bits_per_weight"], types=type_shares(report))
            rows.append(row)
    write_result({"benchmark": "llama_cpp_gguf", "threads": args.threads, "windows": args.windows,
                  "seq_len": args.seq_len, "llama_cpp_python": __import__("llama_cpp").__version__, "rows": rows})
    print("\n| file | MB | bits/weight | types | ppl llama.cpp | ppl in qat (packed; fp rows: fp32) | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        types = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["types"].items() if v >= 0.01)
        packed = "–" if r["ppl_packed"] is None else f"{r['ppl_packed']:.2f}"
        print(f"| {r['name']} | {r['file_mb']:.1f} | {r['bits_per_weight']:.2f} | {types} | {r['ppl_llama_cpp']:.2f} "
              f"| {packed} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} |")


if __name__ == "__main__":
    main()
