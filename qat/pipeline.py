"""The whole flow of a run, top to bottom (docs/architecture.md):

  load model -> data -> ppl(fp) -> PTQ init -> prepare (QATLinear) -> ppl(init)
  -> QAT (Lightning; skipped when trainer.max_steps=0) -> convert (PackedLinear)
  -> ppl(final, through the packed ops) -> export/ + results.json + table + logger
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from qat.config_checks import check_config
from qat.data import LMDataModule
from qat.data.corpora import text_split_files
from qat.errors import QATError, TrainingDiverged, TrainingInterrupted, check_choice
from qat.eval import perplexity
from qat.eval.perplexity import cached_perplexity
from qat.export import export_tensors, model_bits, round_unquantized, save_export
from qat.export import gguf as gguf_export
from qat.fetch import atomic_write_bytes, cache_dir
from qat.kernels import ops
from qat.methods import build_method
from qat.models import load_model
from qat.nn import bits_report, convert, layer_stats_report, prepare, quantizable_linears
from qat.nn.embedding import check_embedding_format, convert_embeddings, snap_embeddings
from qat.ptq.gptq import SALIENCY_KINDS
from qat.ptq.initializers import INITIALIZERS, initialize
from qat.ptq.reconstruct import reconstruct_blocks
from qat.ptq.smooth import smooth_model
from qat.train import AtomicModelCheckpoint, LitQAT, QuantHealth, RefreshBuffers
from qat.train.lit import OPTIMIZERS, TRAINABLE, select_trainable
from qat.train.precision import resolve_precision
from qat.train.sharding import fsdp_strategy, full_state_dict, is_sharded

log = logging.getLogger(__name__)


def method_from_cfg(cfg: DictConfig):
    params = OmegaConf.to_container(cfg.method, resolve=True)
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
        check_choice("init.saliency", cfg.init.get("saliency", "hinv_sq"), SALIENCY_KINDS)
    check_choice("reconstruct.precision", cfg.reconstruct.precision, ["fp32", "bf16"])
    emb_bits = check_embedding_format(cfg.quantize.get("embedding", "fp32"))
    if emb_bits < 16 and cfg.train.params == "all":
        raise QATError(f"train.params=all trains the embedding, which quantize.embedding={cfg.quantize.embedding} "
                       "keeps frozen on its grid; use train.params=quantized | quantized+norms, or "
                       "quantize.embedding=fp16 | fp32")
    if cfg.ckpt_path:
        check_checkpoint(str(cfg.ckpt_path), method_from_cfg(cfg))
    check_data_files(OmegaConf.to_container(cfg.data, resolve=True))


def run_precision(cfg: DictConfig) -> str:
    """trainer.precision as Lightning gets it (`auto` resolved for this machine)."""
    return resolve_precision(cfg.trainer.get("precision", "32-true"), str(cfg.trainer.get("accelerator", "auto")))


def check_trainer(cfg: DictConfig) -> None:
    """The Trainer knobs Lightning would reject with a traceback, and quantize.skip's type."""
    run_precision(cfg)
    devices = cfg.trainer.get("devices", "auto")
    ok = devices == "auto" or (isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1) or (
        OmegaConf.is_list(devices) and len(devices) > 0 and all(isinstance(d, int) and d >= 0 for d in devices))
    if not ok:
        raise QATError(f"trainer.devices={devices!r}: must be a positive integer, a list of device indices, or auto")
    skip = cfg.quantize.get("skip", [])
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
    extra = wandb_run_fields(cfg) if str(cfg.logger.get("_target_", "")).endswith("WandbLogger") else {}
    return instantiate(cfg.logger, **extra)


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    t["precision"] = run_precision(cfg)
    log.info("trainer.precision=%s -> %s", cfg.trainer.get("precision"), t["precision"])
    if t.get("strategy") == "fsdp":  # torch FSDP2 through Lightning's ModelParallelStrategy (CPU or GPU)
        t["strategy"] = fsdp_strategy(t.get("devices", 1), int(t.get("num_nodes", 1)))
    elif t.get("strategy") == "ddp":
        # the methods' frozen buffers (salient masks and codes, group ids: ~2 bytes a weight) are
        # equal on every rank; DDP's default would resend them all before every forward
        t["strategy"] = DDPStrategy(broadcast_buffers=False)
    logger = build_logger(cfg)
    callbacks = [QuantHealth(every=int(cfg.quant_health_every))]
    refresh_every = method_from_cfg(cfg).refresh_every()  # e.g. dyngroup's method.regroup_every
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


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """One run: returns the results dict it also writes to run_dir/results.json."""
    validate(cfg)
    method = method_from_cfg(cfg)
    if cfg.get("plan"):
        from qat.plan import plan_memory, print_plan

        plan = plan_memory(cfg)
        print_plan(plan)
        return {"status": "plan", "plan": plan}
    started = time.time()
    loaded = load_model(OmegaConf.to_container(cfg.model, resolve=True))
    model = loaded.model
    n_params = sum(p.numel() for p in model.parameters())  # tied matrices once
    skip = list(cfg.quantize.skip)
    # the unquantized fp reference (method=fp16) keeps its weights as they are; its export is fp16
    emb_fmt = str(cfg.quantize.get("embedding", "fp32")) if method.quantizes else "fp16"
    gptq_block = int(cfg.init.get("block_size", 128)) if cfg.init.name == "gptq_hessian" else None
    linears = quantizable_linears(model, skip)
    for name, lin in linears:  # shape checks: before the run folder exists
        method.check_layer(name, lin.out_features, lin.in_features, gptq_block)
    # the GGUF is written from the export folder: export.gguf=true writes it too (method=fp16 included)
    write_export = method.quantizes if cfg.export.get("folder") is None else bool(cfg.export.folder)
    if cfg.export.get("gguf"):  # what llama.cpp cannot hold fails now, not after training
        if cfg.export.get("folder") is False:
            raise QATError("export.gguf=true is written from the export folder: drop export.folder=false")
        write_export = True
        gguf_export.check_run(method.name, dataclasses.asdict(method), model.config.to_dict(),
                              {n: lin.in_features for n, lin in linears}, emb_fmt,
                              None if cfg.model.get("source") == "embedded" else loaded.tokenizer,
                              cfg.export.get("gguf_pre"))

    L.seed_everything(int(cfg.seed), workers=True)
    seconds = {"calibrate": 0.0, "reconstruct": 0.0, "train": 0.0, "eval": 0.0}
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    max_steps = int(cfg.trainer.max_steps)
    data_cfg["total_batches"] = max_steps * int(cfg.trainer.get("accumulate_grad_batches", 1))
    data = LMDataModule(data_cfg, loaded.tokenizer, getattr(loaded.tokenizer, "name_or_path", loaded.name),
                        seed=int(cfg.seed))
    test = data.test_tokens
    smooth_key = "init.n_samples (method.smooth=true calibrates on them; method.smooth=false needs none)"
    if cfg.init.get("needs_calibration", False):  # before the run folder
        data.check_windows(int(cfg.init.get("n_samples", 32)), int(cfg.init.get("seq_len", 512)), "init.n_samples")
    elif method.smooth and method.quantizes:
        data.check_windows(int(cfg.init.get("n_samples", 32)), int(cfg.init.get("seq_len", 512)), smooth_key)
    if int(cfg.reconstruct.epochs) > 0 and method.quantizes:
        data.check_windows(int(cfg.reconstruct.n_samples), int(cfg.reconstruct.seq_len), "reconstruct.n_samples")

    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero():  # under DDP every rank runs this script; one writes the run's files
        atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(run_config(cfg)).encode())

    def ppl(m, desc):
        t0 = time.time()
        value, n = perplexity(m, test, int(cfg.eval.seq_len), cfg.eval.max_windows, desc=desc)
        seconds["eval"] += time.time() - t0
        return value, n

    fp_cache = cache_dir() / "ppl" if cfg.eval.get("cache_fp", False) else None
    ppl_fp, eval_tokens = cached_perplexity(model, test, int(cfg.eval.seq_len), cfg.eval.max_windows,
                                            lambda: ppl(model, "ppl fp"), fp_cache)
    log.info("ppl fp = %.3f over %d tokens", ppl_fp, eval_tokens)

    kd = float(cfg.distill.alpha) > 0 and max_steps > 0
    recon_epochs = int(cfg.reconstruct.epochs) if method.quantizes else 0
    fp_model = copy.deepcopy(model).eval() if kd or recon_epochs > 0 else None  # before PTQ edits it
    teacher = fp_model if kd else None
    t0 = time.time()
    init_cfg = OmegaConf.to_container(cfg.init, resolve=True)
    # a method whose state cannot depend on data (fp16 weights) is seeded data-free whatever init says:
    # no calibration is run, and results.json says rtn
    init_name = "rtn" if (method.data_free_only or not method.quantizes) else init_cfg["name"]
    if init_name != init_cfg["name"]:
        log.info("method=%s takes no data-dependent seed: init=%s runs as rtn", method.name, init_cfg["name"])
    calib = None
    if init_cfg.get("needs_calibration", False) and init_name != "rtn":
        calib = data.calibration(int(init_cfg["n_samples"]), int(init_cfg["seq_len"]))
    input_scales: dict = {}
    if method.smooth and method.quantizes:  # before the PTQ seed: it quantizes the smoothed weights
        smooth_calib = calib if calib is not None else data.calibration(
            int(init_cfg.get("n_samples", 32)), int(init_cfg.get("seq_len", 512)), key=smooth_key)
        input_scales, smooth_rows = smooth_model(model, smooth_calib, method, skip)
        if rank_zero():
            atomic_write_bytes(run_dir / "smoothing.json", json.dumps(smooth_rows, indent=1).encode())
    seed = initialize(model, method, init_name, skip, calib, init_cfg, loaded.name,
                      use_cache=bool(init_cfg.get("cache", False)))
    states, errors = seed.states, seed.errors
    for name, scale in input_scales.items():  # no norm before these linears: they keep the factor
        states[name]["input_scale"] = scale
    if errors and rank_zero():
        atomic_write_bytes(run_dir / "calibration_errors.json", json.dumps(errors, indent=1).encode())
    prepare(model, method, states)
    if method.quantizes:
        snap_embeddings(model, emb_fmt)  # the values the export stores: fake-quant == packed
    seconds["calibrate"] = time.time() - t0
    ppl_ptq = None
    if recon_epochs > 0:
        ppl_ptq, _ = ppl(model, "ppl ptq (before reconstruction)") if cfg.reconstruct.eval_ptq else (None, 0)
        t0 = time.time()
        r = cfg.reconstruct
        recon_calib = data.calibration(int(r.n_samples), int(r.seq_len), key="reconstruct.n_samples")
        recon = reconstruct_blocks(model, fp_model, recon_calib, recon_epochs, float(r.lr), seed=int(cfg.seed),
                                   bf16=str(r.precision) == "bf16")
        if rank_zero():
            atomic_write_bytes(run_dir / "reconstruction.json", json.dumps(recon, indent=1).encode())
        seconds["reconstruct"] = time.time() - t0
    ppl_init, _ = ppl(model, "ppl init") if method.quantizes else (ppl_fp, eval_tokens)
    log.info("ppl ptq = %s, ppl init = %.3f", ppl_ptq, ppl_init)

    train_tokens, trainer = 0, None
    if max_steps > 0:
        t0 = time.time()
        trainable = select_trainable(model, str(cfg.train.params))
        log.info("QAT trains %s parameters (train.params=%s)", trainable, cfg.train.params)
        lit = LitQAT(model, OmegaConf.to_container(cfg.optim, resolve=True),
                     OmegaConf.to_container(cfg.distill, resolve=True), max_steps, teacher,
                     method={"name": method.name, "params": dataclasses.asdict(method)})
        trainer = build_trainer(cfg, run_dir)
        lit.train()  # from_pretrained returns the model in eval mode
        try:
            trainer.fit(lit, datamodule=data, ckpt_path=cfg.ckpt_path or None)
        except (TrainingDiverged, SystemExit) as e:
            # SystemExit: Lightning turns SIGTERM into SIGTERMException and Ctrl-C into sys.exit(1),
            # both after a graceful stop: say so, and how to resume (it exited 0 on SIGTERM)
            if isinstance(e, SystemExit) and not isinstance(e, SIGTERMException) and e.code != 1:
                raise
            seconds["train"] = time.time() - t0
            seconds["total"] = time.time() - started
            results = {"method": method.name, "init": init_name, "model": loaded.name,
                       "ppl": {"fp": ppl_fp, "init": ppl_init, "final": None}, "eval_tokens": eval_tokens,
                       "seconds": seconds}
            if isinstance(e, TrainingDiverged):
                results.update(status="diverged", diverged={"step": e.step, "what": e.what})
                error: Exception = e
            else:
                last = run_dir / "checkpoints" / "last.ckpt"
                error = TrainingInterrupted("SIGTERM" if isinstance(e, SIGTERMException) else "SIGINT",
                                            int(trainer.global_step), str(last) if last.exists() else None)
                results.update(status="interrupted", interrupted={"signal": error.signal_name, "step": error.step,
                                                                   "checkpoint": error.checkpoint})
            if rank_zero():
                atomic_write_bytes(run_dir / "results.json", json.dumps(results, indent=1).encode())
            raise error from None
        seconds["train"] = time.time() - t0
        world = trainer.world_size
        train_tokens = (trainer.global_step * int(cfg.trainer.get("accumulate_grad_batches", 1))
                        * int(cfg.data.batch_size) * int(cfg.data.seq_len) * world)
        model = lit.model
        if is_sharded(model):  # FSDP: every rank sends its shards, rank 0 loads them into a whole model
            weights = full_state_dict(model)
            if trainer.is_global_zero:
                model = prepare(load_model(OmegaConf.to_container(cfg.model, resolve=True)).model, method, states)
                model.load_state_dict(weights)
        if not trainer.is_global_zero:  # the other DDP ranks stop here: rank 0 evaluates and exports
            return {"status": "ok", "rank": trainer.global_rank}

    # the last validation perplexity of training (fake-quant): the sweeps' objective, not the test split
    val = trainer.callback_metrics.get("val/ppl") if trainer is not None else None
    ppl_val = float(val) if val is not None else None
    model = convert(model.float())
    emb_record = convert_embeddings(model, emb_fmt)
    if method.quantizes:
        round_unquantized(model, emb_fmt)  # stored in fp16 by the export: evaluate what is stored
    ops.kernel_calls(reset=True)
    ppl_final, _ = ppl(model, "ppl final (packed)")
    kernels = ops.kernel_calls(reset=True)  # which path each packed op took: {"<op>/<path>": calls}
    if kernels:
        log.info("packed ops ran through %s", kernels)
    bits = bits_report(model) or {"weight": 16.0, "storage": 16.0}
    layer_stats = layer_stats_report(model)  # e.g. dyngroup's groups actually used per grouping
    if layer_stats:
        log.info("packed layers: %s", layer_stats)
    bits["model"] = model_bits(export_tensors(model, emb_fmt), n_params)

    if write_export:
        save_export(model, run_dir / "export", loaded.name, loaded.tokenizer, embedding=emb_record,
                    model_source=str(cfg.model.get("source", "embedded")))
    gguf = None
    if cfg.export.get("gguf"):
        try:
            report = gguf_export.write_gguf(run_dir, run_dir / "model.gguf", pre=cfg.export.get("gguf_pre"))
            print(gguf_export.summary_table(report), flush=True)
            gguf = {"file": "model.gguf", "bytes": report["bytes"], "bits_per_weight": report["bits_per_weight"],
                    "types": gguf_export.type_shares(report)}
        except Exception as e:  # after training: keep the run and its export, say what failed
            log.error("model.gguf not written: %s", e)
            gguf = {"error": f"{type(e).__name__}: {e}" if not isinstance(e, QATError) else str(e)}
    seconds["total"] = time.time() - started
    results = {
        "method": method.name, "init": init_name, "model": loaded.name,
        **method.report_fields(calibrated=init_name != "rtn"),  # salient_ratio; a data-free seed's settings
        "ppl": {"fp": ppl_fp, "init": ppl_init, "final": ppl_final, **({"ptq": ppl_ptq} if ppl_ptq else {}),
                **({"val_last": ppl_val} if ppl_val is not None else {})},
        "eval_tokens": eval_tokens,
        "bits": {"weight": bits["weight"], "storage": bits["storage"], "model": bits["model"]},
        "embedding": emb_fmt, "parameters": n_params, "kernels": kernels,
        "precision": run_precision(cfg),
        "train_tokens": train_tokens, "seconds": seconds, "status": "ok",
        **({"gguf": gguf} if gguf else {}), **layer_stats,
    }
    if errors:  # GPTQ layers, and those whose Hessian stayed indefinite and got the data-free seed
        results["calibration"] = seed.calibration_counts()
    atomic_write_bytes(run_dir / "results.json", json.dumps(results, indent=1).encode())
    print_table(results)
    wandb_run = log_results(cfg, results, errors, trainer.logger if trainer is not None else None,
                            run_dir / "export" if write_export else None)
    if wandb_run:  # so that eval.py's later accuracies join the same W&B run
        results["wandb"] = wandb_run
        atomic_write_bytes(run_dir / "results.json", json.dumps(results, indent=1).encode())
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
    if export_dir is not None and cfg.get("log_export_artifact", True) and hasattr(logger.experiment, "log_artifact"):
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
