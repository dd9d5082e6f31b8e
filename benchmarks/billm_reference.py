"""BiLLM: this project's `method=billm` PTQ against the released code (Aaronhuang-778/BiLLM,
`bigptq.BRAGPTQ.fasterquant` with `binary.Binarization(method="braq")`), under identical settings.

1. Layer check: the linears of decoder layer 0, the same W and the same H (the fp layer's
   calibration inputs): the released fasterquant against ours with scale_dtype=float32 (what the
   released code computes in), also with the stored values' sign(0) = 0 as released (quirk (c),
   not storable: expected bit-identical), and with the default float16 (what is stored;
   compared by the relative output error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)).
2. Model: the same model, calibration windows, sequential loop (`qat.ptq.calibrate.
   sequential_quantize`, init.true_sequential as configured; the released run.py collects every
   linear of a layer in one pass: `false`, the default) and test windows; only the per-layer
   quantizer differs. Perplexity of the PTQ alone (no training) for each.

The released code is imported at run time from a checkout you point to; nothing of it is
vendored here. Imports it needs but never uses (`exceptiongroup`) are shimmed here.

  git clone https://github.com/Aaronhuang-778/BiLLM /tmp/billm-ref
  OMP_NUM_THREADS=1 python benchmarks/billm_reference.py --reference /tmp/billm-ref \
      [--variants float16 float32] [hydra overrides, e.g. eval.max_windows=20]

Writes benchmarks/results/billm_reference-<model>-<date>.json and prints a table.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import io
import json
import sys
import time
import types
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bitgemm import commit  # this folder is on sys.path when run as a script

from qat.data import LMDataModule
from qat.eval import perplexity
from qat.io import atomic_write_bytes
from qat.methods import build_method
from qat.methods.billm import BiLLM
from qat.models import load_model
from qat.models.arch import architecture, decoder_layers
from qat.nn import prepare
from qat.ptq.calibrate import HessianAccumulator, capture_layer0_inputs, feed_inputs, sequential_quantize
from qat.ptq.gptq import gptq
from qat.ptq.initializers import initialize

ROOT = Path(__file__).resolve().parents[1]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return hydra_compose("train", overrides=["init=gptq_hessian", "logger=none", "method=billm", *overrides])


def import_reference(path: Path) -> types.SimpleNamespace:
    """The released bigptq / binary modules (they import utils.* and each other by plain name)."""
    if not (path / "bigptq.py").is_file() or not (path / "binary.py").is_file():
        raise SystemExit(f"--reference {path}: no bigptq.py and binary.py there (a checkout of Aaronhuang-778/BiLLM)")
    for name in ("exceptiongroup", "pyparsing"):  # imported, never used
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = types.SimpleNamespace(catch=None, line=None)
    if not torch.cuda.is_available():  # fasterquant ends with torch.cuda.synchronize()
        torch.cuda.synchronize = lambda *a, **k: None
    sys.path.insert(0, str(path))
    import bigptq
    import binary

    return types.SimpleNamespace(bigptq=bigptq, binary=binary)


def reference_layer(ref: types.SimpleNamespace, W: torch.Tensor, H: torch.Tensor, metric: str,
                    block: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """The released fasterquant's weights for W and H (run.py's settings: braq, groupsize = block)."""
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, device=W.device)
    lin.weight.data = W.clone().float()
    g = ref.bigptq.BRAGPTQ(lin, ref.binary.Binarization(lin.weight, method="braq", groupsize=block),
                           salient_metric=metric)
    g.H = H.clone().float()  # 2/N·XᵀX over tokens; the released code scales by sequences: scale-free here
    with contextlib.redirect_stdout(io.StringIO()):  # it prints mask fractions, time and error per layer
        g.fasterquant(blocksize=block, percdamp=percdamp)
    return lin.weight.detach().clone()


def use_released_sign(method: BiLLM) -> None:
    """Every value this method computes (GPTQ, fake quant) with torch.sign, 0 -> 0, as released
    (quirk (c)): PTQ only (no STE, and not storable in sign bits: pack would not reproduce it)."""
    method.binarize = lambda latent, buffers, sign=None: BiLLM.binarize(method, latent, buffers, torch.sign)


def ours_layer(W: torch.Tensor, H: torch.Tensor, block: int, percdamp: float, released_sign: bool = False,
               **params) -> torch.Tensor:
    """released_sign: the stored values use torch.sign (0 -> 0) as released, instead of sign(0) = +1
    (quirk (c); not storable in sign bits: this check only)."""
    method = build_method("billm", block_size=block, **params)
    if released_sign:
        use_released_sign(method)
    return gptq(W, H, method.gptq_quantizer(W, torch.diag(H), block), block_size=block, percdamp=percdamp).quantized


def relative_output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    D = W - Q
    return float((D @ H * D).sum() / (W @ H * W).sum())


@torch.no_grad()
def layer_check(ref, model, calib, metric: str, block: int, percdamp: float) -> list[dict]:
    """Decoder layer 0's linears, Hessians from the fp layer's inputs."""
    _, layers = decoder_layers(model)
    inputs, kwargs = capture_layer0_inputs(model, layers, calib)
    names = [n for g in architecture(model).groups for n in g.linears]
    linears = {n: layers[0].get_submodule(n) for n in names}
    acc = {n: HessianAccumulator(m.in_features, m.weight.device) for n, m in linears.items()}
    feed_inputs(layers[0], {m: acc[n] for n, m in linears.items()}, inputs, kwargs)
    rows = []
    for n, lin in linears.items():
        W, H = lin.weight.detach().float(), acc[n].H
        t0 = time.time()
        released = reference_layer(ref, W, H, metric, block, percdamp)
        t_released = time.time() - t0
        t0 = time.time()
        fp32 = ours_layer(W, H, block, percdamp, salient_metric=metric, scale_dtype="float32")
        t_ours = time.time() - t0
        fp16 = ours_layer(W, H, block, percdamp, salient_metric=metric)
        same_sign = ours_layer(W, H, block, percdamp, True, salient_metric=metric, scale_dtype="float32")
        exact = ours_layer(W, H, block, percdamp, salient_metric=metric, block_errors="exact")
        diff = (fp32 - released).abs()
        rows.append({"layer": n, "shape": list(W.shape), "float32_max_abs_diff": float(diff.max()),
                     "float32_entries_differing": int((diff > 0).sum()),
                     "float32_torch_sign_max_abs_diff": float((same_sign - released).abs().max()),
                     "weight_max_abs": float(released.abs().max()),
                     "rel_output_error_released": relative_output_error(W, released, H),
                     "rel_output_error_ours_float32": relative_output_error(W, fp32, H),
                     "rel_output_error_ours_float16": relative_output_error(W, fp16, H),
                     "rel_output_error_ours_float16_exact_block_errors": relative_output_error(W, exact, H),
                     "seconds_released": t_released, "seconds_ours": t_ours})
        r = rows[-1]
        print(f"  {n:>16} {tuple(W.shape)}: float32 max|Δ| {r['float32_max_abs_diff']:.2e} "
              f"({r['float32_entries_differing']} entries differ; with torch.sign: "
              f"{r['float32_torch_sign_max_abs_diff']:.2e}); rel output error released "
              f"{r['rel_output_error_released']:.4f} ours fp32 {r['rel_output_error_ours_float32']:.4f} "
              f"ours fp16 {r['rel_output_error_ours_float16']:.4f} "
              f"(block_errors=exact {r['rel_output_error_ours_float16_exact_block_errors']:.4f})", flush=True)
    return rows


def reference_quantize(ref, metric: str, block: int, percdamp: float):
    def quantize(name: str, lin: torch.nn.Linear, H: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"weight": reference_layer(ref, lin.weight.detach().float(), H, metric, block, percdamp)}

    return quantize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, type=Path, help="checkout of Aaronhuang-778/BiLLM")
    ap.add_argument("--variants", nargs="*", default=["float16"],
                    help="this project's method.scale_dtype values to run on the model (float16 | float32), "
                         "optionally +released_sign (the stored values' sign(0) = 0 as released: not storable)")
    ap.add_argument("--skip-released", action="store_true", help="run only this project's variants on the model")
    ap.add_argument("--skip-model", action="store_true", help="the layer check only")
    ap.add_argument("--skip-layer-check", action="store_true", help="the model comparison only")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("overrides", nargs="*", help="hydra overrides of conf/train.yaml")
    args = ap.parse_args()
    ref = import_reference(args.reference)
    cfg = compose(args.overrides)
    torch.manual_seed(int(cfg.seed))
    method_cfg = {k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k != "name"}
    metric = method_cfg["salient_metric"]
    init_cfg = OmegaConf.to_container(cfg.init, resolve=True)
    skip, block, percdamp = list(cfg.quantize.skip), int(cfg.init.block_size), float(cfg.init.percdamp)
    true_sequential = bool(cfg.init.true_sequential)

    def fresh():
        return load_model(OmegaConf.to_container(cfg.model, resolve=True))

    loaded = fresh()
    data = LMDataModule(OmegaConf.to_container(cfg.data, resolve=True), loaded.tokenizer,
                        getattr(loaded.tokenizer, "name_or_path", loaded.name), seed=int(cfg.seed))
    calib = data.calibration(int(cfg.init.n_samples), int(cfg.init.seq_len))
    layers = []
    if not args.skip_layer_check:
        print("layer check (decoder layer 0, same W and H):", flush=True)
        layers = layer_check(ref, loaded.model, calib, metric, block, percdamp)
    result = {"benchmark": "billm_reference", "model": loaded.name, "date": dt.date.today().isoformat(),
              "commit": commit(), "device": "cuda" if torch.cuda.is_available() else "cpu",
              "salient_metric": metric, "block_size": block, "percdamp": percdamp,
              "true_sequential": true_sequential, "method": method_cfg,
              "calibration": {"n_samples": int(cfg.init.n_samples), "seq_len": int(cfg.init.seq_len)},
              "layer_check": layers}
    if not args.skip_model:
        seq_len, windows = int(cfg.eval.seq_len), cfg.eval.max_windows
        ppl_fp, tokens = perplexity(loaded.model, data.test_tokens, seq_len, windows, desc="ppl fp")
        result.update({"eval": {"seq_len": seq_len, "windows": windows, "tokens": tokens}, "ppl_fp": ppl_fp,
                       "ours": {}})
        for variant in args.variants:
            model = fresh().model
            scale_dtype, _, sign = variant.partition("+")
            method = build_method("billm", **{**method_cfg, "scale_dtype": scale_dtype})
            if sign == "released_sign":
                use_released_sign(method)
            t0 = time.time()
            states = initialize(model, method, "gptq_hessian", skip, calib, init_cfg, loaded.name).states  # no cache
            prepare(model, method, states)
            seconds = time.time() - t0
            ppl = perplexity(model, data.test_tokens, seq_len, windows, desc=f"ppl ours {variant}")[0]
            result["ours"][variant] = {"ppl": ppl, "seconds": seconds}
            print(f"ours (scale_dtype={variant}): ppl {ppl:.3f}  ({seconds:.0f} s)", flush=True)
        if args.skip_released:
            write_result(args.out, result)
            return
        model = fresh().model
        t0 = time.time()
        sequential_quantize(model, calib, skip, reference_quantize(ref, metric, block, percdamp),
                            lambda state: state["weight"], true_sequential=true_sequential)
        seconds = time.time() - t0
        ppl = perplexity(model, data.test_tokens, seq_len, windows, desc="ppl released")[0]
        result["released"] = {"ppl": ppl, "seconds": seconds}
        print(f"released code: ppl {ppl:.3f}  ({seconds:.0f} s)   (fp {ppl_fp:.3f})", flush=True)
    write_result(args.out, result)


def write_result(folder: Path, result: dict) -> None:
    """<folder>/billm_reference-<model>-<date>.json, written whole or not at all."""
    path = folder / f"billm_reference-{result['model']}-{result['date']}.json"
    atomic_write_bytes(path, json.dumps(result, indent=1).encode())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
