"""GPTQ: this project's engine against the reference implementation, IST-DASLab/gptq, under
identical settings.

Both run on the same model, the same calibration samples, the same test windows and the same
sequential calibration loop (`qat.ptq.calibrate.sequential_quantize`, true-sequential); only
the per-layer GPTQ differs: the project's `qat.ptq.gptq` + `method=gptq`, or the reference's
own `GPTQ.fasterquant` with its `Quantizer` (asymmetric, per channel, no MSE search, block 128,
damp 0.01). The reference code is imported at run time from a checkout you point to; nothing of
it is vendored here.

  git clone https://github.com/IST-DASLab/gptq /tmp/gptq-ref
  python benchmarks/gptq_reference.py --reference /tmp/gptq-ref --configs 4:0 4:64 3:0 2:64 \
      [hydra overrides for the model, data, init and eval, e.g. eval.max_windows=20]

Writes benchmarks/results/gptq_reference-<model>-<date>.json and prints a table.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bitgemm import commit  # this folder is on sys.path when run as a script

from qat.data import LMDataModule
from qat.eval import perplexity
from qat.methods import build_method
from qat.models import load_model
from qat.nn import prepare
from qat.ptq.calibrate import sequential_quantize
from qat.ptq.initializers import initialize

ROOT = Path(__file__).resolve().parents[1]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        return hydra_compose("train", overrides=["init=gptq_hessian", "logger=none", *overrides])


def import_reference(path: Path):
    """The reference's gptq.py / quant.py modules (they import each other by plain name)."""
    if not (path / "gptq.py").is_file() or not (path / "quant.py").is_file():
        raise SystemExit(f"--reference {path}: no gptq.py and quant.py there (a checkout of IST-DASLab/gptq)")
    sys.path.insert(0, str(path))
    import gptq as ref_gptq
    import quant as ref_quant

    if not torch.cuda.is_available():  # fasterquant ends with torch.cuda.synchronize()
        torch.cuda.synchronize = lambda *a, **k: None
    return ref_gptq, ref_quant


def reference_quantize(ref_gptq, ref_quant, bits: int, group_size: int, block: int, percdamp: float):
    def quantize(name: str, lin: torch.nn.Linear, H: torch.Tensor) -> dict[str, torch.Tensor]:
        g = ref_gptq.GPTQ(lin)
        g.H = H.clone()  # 2/N·XᵀX over tokens; the reference scales by sequences: GPTQ is scale-free
        g.quantizer = ref_quant.Quantizer()
        g.quantizer.configure(bits, perchannel=True, sym=False, mse=False)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints time and error per layer
            g.fasterquant(blocksize=block, percdamp=percdamp, groupsize=group_size or -1, actorder=False)
        return {"weight": lin.weight.detach().clone()}

    return quantize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, type=Path, help="checkout of IST-DASLab/gptq")
    ap.add_argument("--configs", nargs="+", default=["4:0", "4:64", "3:0", "2:64"],
                    help="bits:group_size (0 = per channel)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("overrides", nargs="*", help="hydra overrides of conf/train.yaml")
    args = ap.parse_args()
    ref_gptq, ref_quant = import_reference(args.reference)
    cfg = compose(args.overrides)
    torch.manual_seed(int(cfg.seed))

    def fresh():
        return load_model(OmegaConf.to_container(cfg.model, resolve=True))

    loaded = fresh()
    data = LMDataModule(OmegaConf.to_container(cfg.data, resolve=True), loaded.tokenizer,
                        getattr(loaded.tokenizer, "name_or_path", loaded.name), seed=int(cfg.seed))
    calib = data.calibration(int(cfg.init.n_samples), int(cfg.init.seq_len))
    seq_len, windows = int(cfg.eval.seq_len), cfg.eval.max_windows
    ppl_fp, tokens = perplexity(loaded.model, data.test_tokens, seq_len, windows, desc="ppl fp")
    skip, block, percdamp = list(cfg.quantize.skip), int(cfg.init.block_size), float(cfg.init.percdamp)
    rows = []
    for spec in args.configs:
        bits, group = (int(v) for v in spec.split(":"))
        row = {"bits": bits, "group_size": group}
        # the project's engine (no PTQ cache: both sides calibrate from scratch)
        model = fresh().model
        method = build_method("gptq", bits=bits, group_size=group)
        t0 = time.time()
        states = initialize(model, method, "gptq_hessian", skip, calib, OmegaConf.to_container(cfg.init, resolve=True),
                            loaded.name).states
        prepare(model, method, states)
        row["project_seconds"] = time.time() - t0
        row["project_ppl"] = perplexity(model, data.test_tokens, seq_len, windows, desc=f"ppl project {spec}")[0]
        # the reference's GPTQ in the same loop
        model = fresh().model
        t0 = time.time()
        sequential_quantize(model, calib, skip, reference_quantize(ref_gptq, ref_quant, bits, group, block, percdamp),
                            lambda state: state["weight"])
        row["reference_seconds"] = time.time() - t0
        row["reference_ppl"] = perplexity(model, data.test_tokens, seq_len, windows, desc=f"ppl reference {spec}")[0]
        rows.append(row)
        print(f"{bits}-bit group {group or 'row':>4}: project {row['project_ppl']:9.2f}   "
              f"reference {row['reference_ppl']:9.2f}   (fp {ppl_fp:.2f})", flush=True)
    result = {"benchmark": "gptq_reference", "model": loaded.name, "date": dt.date.today().isoformat(),
              "commit": commit(), "device": "cuda" if torch.cuda.is_available() else "cpu",
              "calibration": {"n_samples": int(cfg.init.n_samples), "seq_len": int(cfg.init.seq_len)},
              "eval": {"seq_len": seq_len, "windows": windows, "tokens": tokens},
              "ppl_fp": ppl_fp, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gptq_reference-{loaded.name}-{result['date']}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
