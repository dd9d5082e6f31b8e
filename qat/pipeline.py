"""The whole flow of a run, top to bottom (docs/architecture.md), one function per stage:

  load (the fp model) -> load_data -> ppl(fp) -> seed (smoothing, PTQ init, QATLinear, reconstruction;
  ppl(init)) -> train (QAT, Lightning; skipped when trainer.max_steps=0) -> pack (PackedLinear,
  ppl(final) through the packed ops, export/, model.gguf) -> results_record -> results.json + table + logger
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qat.config_checks import check_config, check_moved_method_knobs
from qat.data import LMDataModule
from qat.data.corpora import text_split_files
from qat.data.generated import cached_generated, generated_count
from qat.errors import QATError, TrainingDiverged, TrainingInterrupted, check_choice
from qat.eval import perplexity
from qat.eval.perplexity import cached_perplexity
from qat.export import export_tensors, model_bits, round_unquantized, save_export
from qat.export import gguf as gguf_export
from qat.fetch import cache_dir
from qat.io import atomic_write_bytes
from qat.kernels import ops
from qat.methods import Method, build_method
from qat.models import load_model
from qat.nn import bits_report, convert, frozen_quantized_weights, layer_stats_report, prepare, quantizable_linears
from qat.nn.embedding import check_embedding_format, convert_embeddings, snap_embeddings
from qat.ptq.gptq import SALIENCY_KINDS
from qat.ptq.initializers import INITIALIZERS, InitResult, initialize, weights_fingerprint
from qat.ptq.reconstruct import reconstruct_blocks
from qat.ptq.smooth import smooth_model
from qat.train import AtomicModelCheckpoint, LitQAT, QuantHealth, RefreshBuffers
from qat.train.lit import OPTIMIZERS, TRAINABLE, select_trainable
from qat.train.precision import resolve_precision
from qat.train.sharding import full_state_dict, is_sharded

log = logging.getLogger(__name__)


def method_from_cfg(cfg: DictConfig) -> Method:
    """The run's method: cfg.method's own knobs, plus its inputs' precision (the act group) and the
    smoothing before its seed (the smooth group), which any method takes."""
    params = OmegaConf.to_container(cfg.method, resolve=True)
    check_moved_method_knobs(params)
    params.update(act_bits=cfg.act.bits, smooth=cfg.smooth.enabled)
    if cfg.smooth.enabled:
        params["smooth_alphas"] = list(cfg.smooth.alphas)
    return build_method(params.pop("name"), **params)


def rank_zero() -> bool:
    """True in the process that writes the run's files (the only one outside DDP)."""
    return rank_zero_only.rank == 0


def validate(cfg: DictConfig) -> None:
    """Check the values a run depends on before anything is loaded or written."""
    check_config(cfg)
    check_trainer(cfg)
    check_choice("init", cfg.init.name, INITIALIZERS)
    check_choice("optim.name", cfg.optim.name, OPTIMIZERS)
    check_choice("train.params", cfg.train.params, TRAINABLE)
    if cfg.init.name == "gptq_hessian":
        check_choice("init.saliency", cfg.init.saliency, SALIENCY_KINDS)
    check_choice("reconstruct.precision", cfg.reconstruct.precision, ["fp32", "bf16"])
    emb_bits = check_embedding_format(cfg.quantize.embedding)
    if emb_bits < 16 and cfg.train.params == "all":
        raise QATError(f"train.params=all trains the embedding, which quantize.embedding={cfg.quantize.embedding} "
                       "keeps frozen on its grid; use train.params=quantized | quantized+norms, or "
                       "quantize.embedding=fp16 | fp32")
    if cfg.ckpt_path:
        check_checkpoint(str(cfg.ckpt_path), method_from_cfg(cfg))
    check_data_files(OmegaConf.to_container(cfg.data, resolve=True))


def run_precision(cfg: DictConfig) -> str:
    """trainer.precision as Lightning gets it (`auto` resolved for this machine)."""
    return resolve_precision(cfg.trainer.precision, str(cfg.trainer.accelerator))


def check_trainer(cfg: DictConfig) -> None:
    """The Trainer knobs Lightning would reject with a traceback, and quantize.skip's type."""
    run_precision(cfg)
    devices = cfg.trainer.devices
    ok = devices == "auto" or (isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1) or (
        OmegaConf.is_list(devices) and len(devices) > 0 and all(isinstance(d, int) and d >= 0 for d in devices))
    if not ok:
        raise QATError(f"trainer.devices={devices!r}: must be a positive integer, a list of device indices, or auto")
    skip = cfg.quantize.skip
    if not OmegaConf.is_list(skip) or not all(isinstance(s, str) and s for s in skip):
        raise QATError(f"quantize.skip={skip!r}: must be a list of linear-name substrings, e.g. [lm_head]")


def check_data_files(data_cfg: dict) -> None:
    """data=text: every named file exists and is non-empty text (before any work)."""
    if data_cfg.get("source") == "text":
        text_split_files(data_cfg)


def check_checkpoint(path: str, method: Any = None) -> None:
    """A checkpoint to resume from must exist, unpickle as a Lightning checkpoint and (when it
    records one) come from the same method and settings. mmap: only the structure is read, not
    the tensors, so this is cheap for large models."""
    if not Path(path).is_file():
        raise QATError(f"ckpt_path={path!r}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # truncated, garbage, or not a torch file: torch's message is a page long
        raise QATError(f"ckpt_path={path!r}: not a readable checkpoint ({type(e).__name__}); "
                       "it may be truncated or not written by this trainer") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise QATError(f"ckpt_path={path!r}: a torch file but not a Lightning checkpoint "
                       "(no state_dict / global_step)")
    record = ckpt.get("qat_method")
    if method is not None and record:
        params = json.loads(json.dumps(dataclasses.asdict(method), default=str))
        saved = json.loads(json.dumps(record["params"], default=str))
        if record["name"] != method.name:
            raise QATError(f"ckpt_path={path!r} was written by method={record['name']}; this run is "
                           f"method={method.name}: resume with method={record['name']} or drop ckpt_path")
        # settings the checkpoint does not record (added to the method later) are not compared
        changed = {k: (saved[k], v) for k, v in params.items() if k in saved and saved[k] != v}
        if changed:
            raise QATError(f"ckpt_path={path!r} was written with other method settings: " + ", ".join(
                f"method.{k}={old!r} there, {new!r} here" for k, (old, new) in sorted(changed.items())))


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's own settings, resolved: without Hydra's node (present when composed with it)."""
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


def wandb_run_fields(cfg: DictConfig) -> dict[str, Any]:
    """A W&B run's name (method, init and the command line's overrides), its group (the sweep, in
    a Hydra multirun) and tags (method, init, salient ratio / groups / bits where the method has them)."""
    method = OmegaConf.to_container(cfg.method, resolve=True)
    overrides, group = "", None
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        overrides = hc.job.override_dirname
        if hc.mode == RunMode.MULTIRUN:
            group = Path(hc.sweep.dir).name
    name = "-".join(x for x in (method["name"], cfg.init.name, overrides) if x)
    tags = [method["name"], f"init={cfg.init.name}"]
    tags += [f"{k}={method[k]}" for k in ("salient_ratio", "groups", "bits", "scope") if k in method]
    return {"name": name[:128], "group": group, "tags": tags}


def build_logger(cfg: DictConfig) -> Any:
    if not cfg.logger:
        return False
    extra = wandb_run_fields(cfg) if str(cfg.logger._target_).endswith("WandbLogger") else {}
    return instantiate(cfg.logger, **extra)


def build_trainer(cfg: DictConfig, run_dir: Path, method: Method) -> L.Trainer:
    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    t["precision"] = run_precision(cfg)
    log.info("trainer.precision=%s -> %s", cfg.trainer.precision, t["precision"])
    if t.get("strategy") in cfg.strategies:  # ddp | fsdp (conf/train.yaml); absent: Lightning's auto
        t["strategy"] = instantiate(cfg.strategies[t["strategy"]])
    logger = build_logger(cfg)
    callbacks = [QuantHealth(every=int(cfg.quant_health_every))]
    refresh_every = method.refresh_every()  # e.g. dyngroup's method.regroup_every
    if refresh_every > 0:
        callbacks.append(RefreshBuffers(refresh_every))
    if not sys.stdout.isatty():  # the rich bar draws nothing into a log file; tqdm lines do
        callbacks.append(TQDMProgressBar(refresh_rate=5))
    if cfg.checkpoint.enabled:
        callbacks.append(AtomicModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True,
                                               every_n_train_steps=int(cfg.checkpoint.every_n_steps),
                                               save_top_k=-1 if cfg.checkpoint.keep_all else 0))
    return L.Trainer(
        **t, logger=logger, callbacks=callbacks, default_root_dir=str(run_dir),
        enable_checkpointing=bool(cfg.checkpoint.enabled), check_val_every_n_epoch=None,
        num_sanity_val_steps=0, deterministic=False,
    )


def print_table(results: dict[str, Any]) -> str:
    p, b = results["ppl"], results["bits"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    rows = [
        ("method", results["method"]), ("init", results["init"]), ("model", results["model"]),
        ("salient_ratio", results["salient_ratio"]),
        ("ppl fp / init / final", f"{fmt(p['fp'])} / {fmt(p['init'])} / {fmt(p['final'])}"),
        ("eval tokens", results["eval_tokens"]),
        ("bits weight / storage / model", f"{fmt(b['weight'])} / {fmt(b['storage'])} / {fmt(b.get('model'))}"),
        ("train tokens", results["train_tokens"]),
        ("seconds calibrate / reconstruct / train / eval / total",
         " / ".join(f"{v:.0f}" for v in results["seconds"].values())),
        *([("calibrated layers / rtn fallback", " / ".join(str(v) for v in results["calibration"].values()))]
          if "calibration" in results else []),
        *([("gguf bits / MB", f"{results['gguf']['bits_per_weight']:.3f} / {results['gguf']['bytes'] / 1e6:.1f}"
            if "bits_per_weight" in results["gguf"] else f"not written: {results['gguf']['error']}")]
          if "gguf" in results else []),
        ("status", results["status"]),
    ]
    width = max(len(k) for k, _ in rows)
    text = "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
    print("\n" + "=" * 60 + "\n" + text + "\n" + "=" * 60, flush=True)
    return text


# -- the stages of a run, in order; each returns what the next ones read -------------------------

@dataclass
class Loaded:
    """Stage 1: the fp model, checked against the method before any work."""
    model: nn.Module
    tokenizer: Any
    name: str
    n_params: int          # tied matrices once
    embedding: str         # how the embedding and head are stored (quantize.embedding; fp16 for method=fp16)
    write_export: bool     # export/ is written (export.folder, export.gguf)


@dataclass
class Seeded:
    """Stage 3: the training form (QATLinears) from the PTQ seed, and how good it is."""
    model: nn.Module
    init: str                                # the seed that ran: rtn for a method that takes no data-dependent one
    teacher: nn.Module | None                # the frozen fp copy that QAT distills from (distill.alpha > 0)
    ptq: InitResult                          # the seed's states and GPTQ's per-layer errors (calibration_errors.json)
    ppl_ptq: float | None                    # before reconstruction (reconstruct.eval_ptq)
    ppl_init: float | None                   # None: the method quantizes nothing (the fp perplexity)
    seconds_calibrate: float
    seconds_reconstruct: float


@dataclass
class Trained:
    """Stage 4: QAT's model (Lightning), or the seeded one when trainer.max_steps=0."""
    model: nn.Module
    trainer: L.Trainer | None
    tokens: int = 0
    ppl_val: float | None = None             # the last validation perplexity (fake quant): sweeps' objective
    seconds: float = 0.0
    stopped: Exception | None = None         # TrainingDiverged / TrainingInterrupted: no packed model follows
    stop_record: dict[str, Any] = field(default_factory=dict)  # results.json's status and what stopped it
    is_global_zero: bool = True              # False: another DDP / FSDP rank, which stops here


@dataclass
class Packed:
    """Stage 5: the inference form (PackedLinears), measured through the packed ops, and its files."""
    ppl_final: float
    kernels: dict[str, int]
    bits: dict[str, float]
    layer_stats: dict[str, Any]
    gguf: dict[str, Any] | None


class Evaluator:
    """Perplexity on the run's test windows (eval.seq_len, eval.max_windows), timed."""

    def __init__(self, cfg: DictConfig, test: torch.Tensor):
        self.test, self.seq_len, self.windows = test, int(cfg.eval.seq_len), cfg.eval.max_windows
        self.seconds = 0.0

    def __call__(self, model: nn.Module, desc: str) -> tuple[float, int]:
        t0 = time.time()
        # on a CPU the fake-quant weights are built once per pass, not once per window (a GPU
        # rebuilds them in a fraction of its pass and needs the memory a frozen copy takes)
        on_cpu = next(model.parameters()).device.type == "cpu" and not is_sharded(model)
        with frozen_quantized_weights(model) if on_cpu else contextlib.nullcontext():
            value, n = perplexity(model, self.test, self.seq_len, self.windows, desc=desc)
        self.seconds += time.time() - t0
        return value, n


def load(cfg: DictConfig, method: Method) -> Loaded:
    """The fp model; every layer's shape and (export.gguf=true) what llama.cpp can hold, checked now."""
    loaded = load_model(OmegaConf.to_container(cfg.model, resolve=True))
    model = loaded.model
    # the unquantized fp reference (method=fp16) keeps its weights as they are; its export is fp16
    embedding = str(cfg.quantize.embedding) if method.quantizes else "fp16"
    gptq_block = int(cfg.init.block_size) if cfg.init.name == "gptq_hessian" else None
    linears = quantizable_linears(model, list(cfg.quantize.skip))
    for name, lin in linears:  # shape checks: before the run folder exists
        method.check_layer(name, lin.out_features, lin.in_features, gptq_block)
    # the GGUF is written from the export folder: export.gguf=true writes it too (method=fp16 included)
    write_export = method.quantizes if cfg.export.folder is None else bool(cfg.export.folder)
    if cfg.export.gguf:  # what llama.cpp cannot hold fails now, not after training
        if cfg.export.folder is False:
            raise QATError("export.gguf=true is written from the export folder: drop export.folder=false")
        write_export = True
        gguf_export.check_run(method.name, dataclasses.asdict(method), model.config.to_dict(),
                              {n: lin.in_features for n, lin in linears}, embedding,
                              None if cfg.model.source == "embedded" else loaded.tokenizer,
                              cfg.export.gguf_pre)
    return Loaded(model, loaded.tokenizer, loaded.name, sum(p.numel() for p in model.parameters()),
                  embedding, write_export)


SMOOTH_WINDOWS_KEY = "init.n_samples (smoothing calibrates on them; smooth=none needs none)"


def load_data(cfg: DictConfig, method: Method, loaded: Loaded) -> LMDataModule:
    """Stage 2: the tokenized splits; the training split must hold every window the seed and the
    reconstruction will cut (checked before the run folder)."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg["total_batches"] = int(cfg.trainer.max_steps) * int(cfg.trainer.accumulate_grad_batches)
    fraction = data_cfg.get("generated_fraction", 0.0)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise QATError(f"data.generated_fraction={fraction!r}: must be a number in [0, 1) (0: the corpus alone)")
    gen_batch = data_cfg.get("generated_batch", 32)
    if isinstance(gen_batch, bool) or not isinstance(gen_batch, int) or gen_batch < 1:
        raise QATError(f"data.generated_batch={gen_batch!r}: must be a positive number of sequences sampled at once")
    data_cfg["generated_fraction"], data_cfg["generated_batch"] = fraction, gen_batch  # checked: read as they are
    data = LMDataModule(data_cfg, loaded.tokenizer, getattr(loaded.tokenizer, "name_or_path", loaded.name),
                        seed=int(cfg.seed))
    if cfg.init.needs_calibration:
        data.check_windows(int(cfg.init.n_samples), int(cfg.init.seq_len), "init.n_samples")
    elif method.smooth and method.quantizes:
        data.check_windows(int(cfg.init.n_samples), int(cfg.init.seq_len), SMOOTH_WINDOWS_KEY)
    if int(cfg.reconstruct.epochs) > 0 and method.quantizes:
        data.check_windows(int(cfg.reconstruct.n_samples), int(cfg.reconstruct.seq_len), "reconstruct.n_samples")
    return data


def planned_world_size(cfg: DictConfig) -> int:
    """The processes the Trainer will run (devices × nodes), before it exists: a device list counts
    its entries; `auto` is one CPU process, or every visible GPU."""
    devices = cfg.trainer.devices
    if devices == "auto":
        gpu = str(cfg.trainer.accelerator) == "gpu" and torch.cuda.is_available()
        devices = torch.cuda.device_count() if gpu else 1
    elif OmegaConf.is_list(devices):
        devices = len(devices)
    return max(int(devices), 1) * int(cfg.trainer.num_nodes)


def generate_text(cfg: DictConfig, method: Method, loaded: Loaded, data: LMDataModule) -> dict[str, Any] | None:
    """data.generated_fraction > 0: the fp model writes that share of QAT's training sequences
    (qat.data.generated; cached), under the run's precision. None when off or nothing trains."""
    fraction = float(data.cfg["generated_fraction"])  # checked by load_data
    if fraction == 0.0 or int(cfg.trainer.max_steps) <= 0 or not method.quantizes:
        return None
    t0 = time.time()
    n = generated_count(int(data.cfg["total_batches"]) * int(data.cfg["batch_size"]) * planned_world_size(cfg),
                        fraction)
    bf16 = run_precision(cfg).startswith("bf16") and str(cfg.trainer.accelerator) == "cpu"
    data.generated = cached_generated(loaded.model, weights_fingerprint(loaded.model), n, data.seq_len,
                                      int(cfg.seed), int(loaded.model.config.vocab_size),
                                      data.cfg["generated_batch"], bf16)
    seconds = time.time() - t0
    log.info("generated text: %d sequences of %d tokens (%.0f%% of the training samples) in %.0f s",
             n, data.seq_len, 100 * fraction, seconds)
    return {"fraction": fraction, "sequences": n, "seconds": seconds}


def seed(cfg: DictConfig, method: Method, loaded: Loaded, data: LMDataModule, evaluate: Evaluator,
         run_dir: Path) -> Seeded:
    """Stage 3: smoothing (smooth=...), the PTQ seed (init=...), QATLinears, block-wise reconstruction
    (reconstruct.epochs > 0); writes smoothing.json, calibration_errors.json, reconstruction.json."""
    model, skip = loaded.model, list(cfg.quantize.skip)
    kd = float(cfg.distill.alpha) > 0 and int(cfg.trainer.max_steps) > 0
    recon_epochs = int(cfg.reconstruct.epochs) if method.quantizes else 0
    fp_model = copy.deepcopy(model).eval() if kd or recon_epochs > 0 else None  # before PTQ edits it
    t0 = time.time()
    init_cfg = OmegaConf.to_container(cfg.init, resolve=True)
    # a method whose state cannot depend on data (fp16 weights) is seeded data-free whatever init says:
    # no calibration is run, and results.json says rtn
    init_name = "rtn" if (method.data_free_only or not method.quantizes) else init_cfg["name"]
    if init_name != init_cfg["name"]:
        log.info("method=%s takes no data-dependent seed: init=%s runs as rtn", method.name, init_cfg["name"])
    calib = None
    if init_cfg["needs_calibration"] and init_name != "rtn":
        calib = data.calibration(int(init_cfg["n_samples"]), int(init_cfg["seq_len"]))
    input_scales: dict = {}
    if method.smooth and method.quantizes:  # before the PTQ seed: it quantizes the smoothed weights
        smooth_calib = calib if calib is not None else data.calibration(
            int(init_cfg["n_samples"]), int(init_cfg["seq_len"]), key=SMOOTH_WINDOWS_KEY)
        input_scales, smooth_rows = smooth_model(model, smooth_calib, method, skip)
        if rank_zero():
            atomic_write_bytes(run_dir / "smoothing.json", json.dumps(smooth_rows, indent=1).encode())
    init = initialize(model, method, init_name, skip, calib, init_cfg, loaded.name,
                      use_cache=bool(init_cfg.get("cache", False)))  # init=rtn has no cache
    states, errors = init.states, init.errors
    for name, scale in input_scales.items():  # no norm before these linears: they keep the factor
        states[name]["input_scale"] = scale
    if errors and rank_zero():
        atomic_write_bytes(run_dir / "calibration_errors.json", json.dumps(errors, indent=1).encode())
    prepare(model, method, states)
    if method.quantizes:
        snap_embeddings(model, loaded.embedding)  # the values the export stores: fake-quant == packed
    seconds_calibrate, seconds_reconstruct = time.time() - t0, 0.0
    ppl_ptq = None
    if recon_epochs > 0:
        ppl_ptq, _ = evaluate(model, "ppl ptq (before reconstruction)") if cfg.reconstruct.eval_ptq else (None, 0)
        t0 = time.time()
        r = cfg.reconstruct
        recon_calib = data.calibration(int(r.n_samples), int(r.seq_len), key="reconstruct.n_samples")
        recon = reconstruct_blocks(model, fp_model, recon_calib, recon_epochs, float(r.lr), seed=int(cfg.seed),
                                   bf16=str(r.precision) == "bf16")
        if rank_zero():
            atomic_write_bytes(run_dir / "reconstruction.json", json.dumps(recon, indent=1).encode())
        seconds_reconstruct = time.time() - t0
    ppl_init = evaluate(model, "ppl init")[0] if method.quantizes else None
    log.info("ppl ptq = %s, ppl init = %s", ppl_ptq, ppl_init)
    return Seeded(model, init_name, fp_model if kd else None, init, ppl_ptq, ppl_init,
                  seconds_calibrate, seconds_reconstruct)


def train(cfg: DictConfig, method: Method, seeded: Seeded, data: LMDataModule, run_dir: Path) -> Trained:
    """Stage 4: QAT through Lightning (skipped when trainer.max_steps=0). A divergence, SIGTERM or
    Ctrl-C stops it gracefully: `stopped` holds the error to raise once results.json says so."""
    max_steps = int(cfg.trainer.max_steps)
    if max_steps == 0:
        return Trained(seeded.model, None)
    t0 = time.time()
    model = seeded.model
    trainable = select_trainable(model, str(cfg.train.params))
    log.info("QAT trains %s parameters (train.params=%s)", trainable, cfg.train.params)
    lit = LitQAT(model, OmegaConf.to_container(cfg.optim, resolve=True),
                 OmegaConf.to_container(cfg.distill, resolve=True), max_steps, seeded.teacher,
                 method={"name": method.name, "params": dataclasses.asdict(method)})
    trainer = build_trainer(cfg, run_dir, method)
    lit.train()  # from_pretrained returns the model in eval mode
    try:
        trainer.fit(lit, datamodule=data, ckpt_path=cfg.ckpt_path or None)
    except (TrainingDiverged, SystemExit) as e:
        # SystemExit: Lightning turns SIGTERM into SIGTERMException and Ctrl-C into sys.exit(1),
        # both after a graceful stop: say so, and how to resume (it exited 0 on SIGTERM)
        if isinstance(e, SystemExit) and not isinstance(e, SIGTERMException) and e.code != 1:
            raise
        if isinstance(e, TrainingDiverged):
            error: Exception = e
            record = {"status": "diverged", "diverged": {"step": e.step, "what": e.what}}
        else:
            last = run_dir / "checkpoints" / "last.ckpt"
            error = TrainingInterrupted("SIGTERM" if isinstance(e, SIGTERMException) else "SIGINT",
                                        int(trainer.global_step), str(last) if last.exists() else None)
            record = {"status": "interrupted", "interrupted": {"signal": error.signal_name, "step": error.step,
                                                               "checkpoint": error.checkpoint}}
        return Trained(model, trainer, seconds=time.time() - t0, stopped=error, stop_record=record)
    seconds = time.time() - t0
    tokens = (trainer.global_step * int(cfg.trainer.accumulate_grad_batches)
              * int(cfg.data.batch_size) * int(cfg.data.seq_len) * trainer.world_size)
    model = lit.model
    if is_sharded(model):  # FSDP: every rank sends its shards, rank 0 loads them into a whole model
        weights = full_state_dict(model)
        if trainer.is_global_zero:
            fresh = load_model(OmegaConf.to_container(cfg.model, resolve=True)).model
            model = prepare(fresh, method, seeded.ptq.states)
            model.load_state_dict(weights)
    val = trainer.callback_metrics.get("val/ppl")
    return Trained(model, trainer, tokens, float(val) if val is not None else None, seconds,
                   is_global_zero=trainer.is_global_zero)


def pack(cfg: DictConfig, method: Method, loaded: Loaded, trained: Trained, evaluate: Evaluator,
         run_dir: Path) -> Packed:
    """Stage 5: QATLinear -> PackedLinear, the final perplexity through the packed ops, the bits;
    export/ and model.gguf."""
    model = convert(trained.model.float())
    emb_record = convert_embeddings(model, loaded.embedding)
    if method.quantizes:
        round_unquantized(model, loaded.embedding)  # stored in fp16 by the export: evaluate what is stored
    ops.kernel_calls(reset=True)
    ppl_final, _ = evaluate(model, "ppl final (packed)")
    kernels = ops.kernel_calls(reset=True)  # which path each packed op took: {"<op>/<path>": calls}
    if kernels:
        log.info("packed ops ran through %s", kernels)
    bits = bits_report(model) or {"weight": 16.0, "storage": 16.0}
    layer_stats = layer_stats_report(model)  # e.g. dyngroup's groups actually used per grouping
    if layer_stats:
        log.info("packed layers: %s", layer_stats)
    bits["model"] = model_bits(export_tensors(model, loaded.embedding), loaded.n_params)

    if loaded.write_export:
        save_export(model, run_dir / "export", loaded.name, loaded.tokenizer, embedding=emb_record,
                    model_source=str(cfg.model.source))
    gguf = None
    if cfg.export.gguf:
        try:
            report = gguf_export.write_gguf(run_dir, run_dir / "model.gguf", pre=cfg.export.gguf_pre)
            print(gguf_export.summary_table(report), flush=True)
            gguf = {"file": "model.gguf", "bytes": report["bytes"], "bits_per_weight": report["bits_per_weight"],
                    "types": gguf_export.type_shares(report)}
        except Exception as e:  # after training: keep the run and its export, say what failed
            log.error("model.gguf not written: %s", e)
            gguf = {"error": f"{type(e).__name__}: {e}" if not isinstance(e, QATError) else str(e)}
    return Packed(ppl_final, kernels, bits, layer_stats, gguf)


def results_record(cfg: DictConfig, method: Method, loaded: Loaded, ppl_fp: float, eval_tokens: int,
                   seeded: Seeded, trained: Trained, packed: Packed | None,
                   seconds: dict[str, float]) -> dict[str, Any]:
    """results.json: the one place it is built. `packed` None: training stopped (status diverged /
    interrupted), so there is no final perplexity, bits or export."""
    ppl_init = seeded.ppl_init if seeded.ppl_init is not None else ppl_fp  # method=fp16: the fp model
    head = {"method": method.name, "init": seeded.init, "model": loaded.name}
    if packed is None:
        return {**head, "ppl": {"fp": ppl_fp, "init": ppl_init, "final": None}, "eval_tokens": eval_tokens,
                "seconds": seconds, **trained.stop_record}
    results = {
        **head,
        **method.report_fields(calibrated=seeded.init != "rtn"),  # salient_ratio; a data-free seed's settings
        "ppl": {"fp": ppl_fp, "init": ppl_init, "final": packed.ppl_final,
                **({"ptq": seeded.ppl_ptq} if seeded.ppl_ptq else {}),
                **({"val_last": trained.ppl_val} if trained.ppl_val is not None else {})},
        "eval_tokens": eval_tokens,
        "bits": {"weight": packed.bits["weight"], "storage": packed.bits["storage"], "model": packed.bits["model"]},
        "embedding": loaded.embedding, "parameters": loaded.n_params, "kernels": packed.kernels,
        "precision": run_precision(cfg),
        "train_tokens": trained.tokens, "seconds": seconds, "status": "ok",
        **({"gguf": packed.gguf} if packed.gguf else {}), **packed.layer_stats,
    }
    counts = seeded.ptq.calibration_counts()
    if counts:  # GPTQ layers, and those whose Hessian stayed indefinite and got the data-free seed
        results["calibration"] = counts
    return results


def write_results(run_dir: Path, results: dict[str, Any]) -> None:
    atomic_write_bytes(run_dir / "results.json", json.dumps(results, indent=1).encode())


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """One run, stage by stage: returns the results dict it also writes to run_dir/results.json."""
    validate(cfg)
    method = method_from_cfg(cfg)
    if cfg.plan:  # the per-device memory plan only: nothing is loaded or written
        from qat.plan import plan_memory, print_plan

        plan = plan_memory(cfg)
        print_plan(plan)
        return {"status": "plan", "plan": plan}
    started = time.time()
    loaded = load(cfg, method)
    L.seed_everything(int(cfg.seed), workers=True)
    data = load_data(cfg, method, loaded)

    run_dir.mkdir(parents=True, exist_ok=True)  # every check passed: the run folder exists from here on
    if rank_zero():  # under DDP every rank runs this script; one writes the run's files
        atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(run_config(cfg)).encode())
    evaluate = Evaluator(cfg, data.test_tokens)
    fp_cache = cache_dir() / "ppl" if cfg.eval.cache_fp else None
    ppl_fp, eval_tokens = cached_perplexity(loaded.model, evaluate.test, evaluate.seq_len, evaluate.windows,
                                            lambda: evaluate(loaded.model, "ppl fp"), fp_cache)
    log.info("ppl fp = %.3f over %d tokens", ppl_fp, eval_tokens)

    generated = generate_text(cfg, method, loaded, data)  # from the fp model, before the seed edits it
    seeded = seed(cfg, method, loaded, data, evaluate, run_dir)
    trained = train(cfg, method, seeded, data, run_dir)

    def seconds() -> dict[str, float]:
        return {"calibrate": seeded.seconds_calibrate, "reconstruct": seeded.seconds_reconstruct,
                "train": trained.seconds, "eval": evaluate.seconds, "total": time.time() - started}

    if trained.stopped is not None:  # diverged or interrupted: results.json says so, then train.py does
        if rank_zero():
            write_results(run_dir, results_record(cfg, method, loaded, ppl_fp, eval_tokens, seeded, trained,
                                                  None, seconds()))
        raise trained.stopped from None
    if not trained.is_global_zero:  # the other DDP ranks stop here: rank 0 evaluates and exports
        return {"status": "ok", "rank": trained.trainer.global_rank}

    packed = pack(cfg, method, loaded, trained, evaluate, run_dir)
    results = results_record(cfg, method, loaded, ppl_fp, eval_tokens, seeded, trained, packed, seconds())
    if generated:
        results["generated_text"] = generated
    write_results(run_dir, results)
    print_table(results)
    logger = trained.trainer.logger if trained.trainer is not None else None
    wandb_run = log_results(cfg, results, seeded.ptq.errors, logger,
                            run_dir / "export" if loaded.write_export else None)
    if wandb_run:  # so that eval.py's later accuracies join the same W&B run
        results["wandb"] = wandb_run
        write_results(run_dir, results)
    return results


def log_results(cfg: DictConfig, results: dict[str, Any], calibration_errors: list[dict] | None = None,
                logger: Any = None, export_dir: Path | None = None) -> dict[str, Any] | None:
    """The summary to the configured logger (W&B offline by default) as run summary metrics, and
    the per-layer GPTQ reconstruction errors as a table where the logger keeps tables (W&B).
    `logger`: the training run's logger, so that the summary joins that run; built from the config
    when there was no training. Returns the W&B run's id, project and folder (None: not W&B)."""
    if not cfg.logger:
        return None
    logger = logger if logger is not None else build_logger(cfg)
    flat = {f"ppl/{k}": v for k, v in results["ppl"].items()}
    flat.update({f"bits/{k}": v for k, v in results["bits"].items()})
    flat.update({"train_tokens": results["train_tokens"]})
    logger.log_hyperparams(run_config(cfg))
    logger.log_metrics(flat)
    if calibration_errors and hasattr(logger, "log_table"):
        logger.log_table("calibration/rel_output_error", columns=["layer", "rel_output_error"],
                         data=[[e["layer"], e["rel_output_error"]] for e in calibration_errors])
    if export_dir is not None and cfg.log_export_artifact and hasattr(logger.experiment, "log_artifact"):
        import wandb  # the packed export as a model artifact (log_export_artifact=false for large models)

        meta = {"method": results["method"], "bits": results["bits"], "ppl": results["ppl"]}
        artifact = wandb.Artifact(f"export-{logger.experiment.id}", type="model", metadata=meta)
        artifact.add_dir(str(export_dir))
        logger.experiment.log_artifact(artifact)
    logger.finalize("success")
    identity = None
    if hasattr(logger, "experiment") and hasattr(logger.experiment, "finish"):
        exp = logger.experiment
        if not getattr(exp, "disabled", False):  # WANDB_MODE=disabled: a no-op run, nothing to join
            save_dir = OmegaConf.select(cfg, "logger.save_dir", default=None, throw_on_resolution_failure=False)
            identity = {"id": exp.id, "project": exp.project, "dir": str(save_dir or Path(exp.dir).parents[2]),
                        "offline": bool(cfg.logger.get("offline", True))}
        exp.finish()
    return identity
