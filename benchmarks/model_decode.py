"""Model-level benchmark: weight memory and greedy decode tokens/s, fp16 vs packed PB-LLM / binary.

A Llama-2-7B-shaped model with random weights (the speed and size of the packed path do not
depend on the values); each linear is quantized and packed layer by layer (as qat.nn.convert
does after QAT). Decode: greedy, batch 1, HF generate with a KV cache, eager.
Writes benchmarks/results/model_decode-<device>-<date>.json.

  [QAT_GEMV_ALGO=lut] python benchmarks/model_decode.py [--layers 32] [--new-tokens 64]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bitgemm import commit  # this folder is on sys.path when run as a script

from qat.kernels.build import load_extension
from qat.methods import build_method
from qat.nn import PackedLinear
from qat.nn.qat_linear import quantizable_linears, set_submodule


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def pack_model(model, method) -> None:
    for name, lin in quantizable_linears(model, ["lm_head"]):
        state = method.init_state(lin.weight.float())
        packed = method.pack(state.pop("latent"), state)
        set_submodule(model, name, PackedLinear(lin.in_features, lin.out_features, method, packed, None))
        del state, lin
    torch.cuda.empty_cache()


@torch.no_grad()
def decode_tps(model, new_tokens: int) -> float:
    ids = torch.randint(0, 32000, (1, 32), device="cuda")
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - t0)


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    load_extension()
    algo = os.environ.get("QAT_GEMV_ALGO", "signflip")  # the M = 1 kernel the packed layers use
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    rows = []
    for label, method in [("fp16", None), ("binary", build_method("rtn_binary")),
                          ("pbllm_r0.1", build_method("pbllm_qat", salient_ratio=0.1))]:
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).half().eval()
        if method is not None:
            pack_model(model, method)
        rec = {"model": label, "weight_GB": weight_bytes(model) / 1e9,
               "linear_GB": sum(weight_bytes(m) if not isinstance(m, PackedLinear) else m.storage_bits() / 8
                                for _, m in model.named_modules()
                                if isinstance(m, (torch.nn.Linear, PackedLinear)) and _ != "lm_head") / 1e9,
               "decode_tokens_per_s": decode_tps(model, args.new_tokens)}
        rows.append(rec)
        print(f"{label:12s} weights {rec['weight_GB']:6.2f} GB (linears {rec['linear_GB']:6.2f} GB)  "
              f"decode {rec['decode_tokens_per_s']:6.1f} tok/s", flush=True)
        del model
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name().replace(" ", "_")
    result = {"benchmark": "model_decode", "device": torch.cuda.get_device_name(),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "commit": os.environ.get("QAT_COMMIT", commit()), "layers": args.layers,
              "shape": "llama-2-7b", "new_tokens": args.new_tokens, "gemv_algo": algo, "rows": rows}
    tag = "" if algo == "signflip" else f"-{algo}"
    path = out / f"model_decode{tag}-{dev}-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
