"""Memory planner: per-device bytes of a QAT run before launching it (`python train.py ... plan=true`).

Counts come from the model's config (built on the meta device: no weights are read) and the
method's training form; the activation term is an estimate. Strategy `ddp` replicates
everything; `fsdp` shards the trained parameters, their gradients and the optimizer state over
the devices (the frozen teacher stays whole on each). Bytes per quantized weight of the frozen
method buffers: pbllm_qat 2 (salient mask bool + uint8 code), dyngroup 1 (uint8 group id),
rtn_binary 1 (mask), gptq ~0 (scales only).
"""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from qat.errors import QATError

BUFFER_BYTES = {"pbllm_qat": 2.0, "rtn_binary": 1.0, "dyngroup": 1.0, "gptq": 0.0, "fp16": 0.0}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30


def meta_model(model_cfg: dict) -> torch.nn.Module:
    """The architecture on the meta device, from the config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.models.load import embedded_default_dir, tiny_llama

    source = model_cfg.get("source", "embedded")
    if source == "tiny":
        return tiny_llama(model_cfg)
    path = embedded_default_dir() if source == "embedded" else model_cfg["name_or_path"]
    try:
        config = AutoConfig.from_pretrained(str(path))
    except OSError as e:
        raise QATError(f"model.name_or_path={str(path)!r}: no config.json readable ({str(e).splitlines()[0]}); "
                       "give a local folder holding the model's config.json") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def plan_memory(cfg: DictConfig) -> dict[str, Any]:
    """Per-device GiB of each part of a QAT run of `cfg`."""
    from qat.nn import quantizable_linears

    model = meta_model(OmegaConf.to_container(cfg.model, resolve=True))
    method = str(cfg.method.name)
    quantized = sum(m.weight.numel() for _, m in quantizable_linears(model, list(cfg.quantize.skip)))
    if method == "fp16":
        quantized = 0
    total = sum(p.numel() for p in model.parameters())
    fp_trained = {"quantized": 0, "quantized+norms": sum(p.numel() for n, p in model.named_parameters()
                                                          if "norm" in n), "all": total - quantized}
    trained = quantized + fp_trained[str(cfg.train.params)]
    weight_bytes = DTYPE_BYTES[str(cfg.model.dtype)]
    devices = int(cfg.trainer.devices) if str(cfg.trainer.devices).lstrip("-").isdigit() else 1
    devices = max(devices, 1)
    strategy = str(cfg.trainer.get("strategy", "ddp" if devices > 1 else "single"))
    shard = devices if strategy.startswith("fsdp") else 1
    optim_bytes = 2 if str(cfg.optim.name) == "adamw8bit" else 8
    c = model.config
    batch, seq = int(cfg.data.batch_size), int(cfg.data.seq_len)
    precision = str(cfg.trainer.precision)
    if precision == "auto":  # the plan is for the GPU presets: auto there means bf16
        precision = "bf16-mixed" if str(cfg.trainer.accelerator) != "cpu" else "32-true"
    act_bytes = 2 if "16" in precision else 4
    # per layer ~ 34·b·s·h activations kept for backward (no checkpointing; Korthikanti et al.),
    # plus the logits of student and teacher in fp32
    activations = c.num_hidden_layers * 34 * batch * seq * c.hidden_size * act_bytes / 2
    logits = batch * seq * c.vocab_size * 4 * (2 if float(cfg.distill.alpha) > 0 else 1)
    parts = {
        "latent weights (fp32, trained)": 4 * quantized / shard,
        "other weights": weight_bytes * (total - quantized) / (shard if fp_trained[str(cfg.train.params)] else 1),
        "frozen method buffers": BUFFER_BYTES.get(method, 0.0) * quantized / shard,
        "gradients": 4 * trained / shard,
        "optimizer state": optim_bytes * trained / shard,
        "teacher (frozen fp copy)": weight_bytes * total if float(cfg.distill.alpha) > 0 else 0.0,
        "activations + logits (estimate)": activations + logits,
    }
    gib = {k: v / GIB for k, v in parts.items()}
    return {"model": str(cfg.model.get("name", "")), "method": method, "strategy": strategy,
            "devices": devices, "parameters": total, "quantized_weights": quantized,
            "per_device_gib": gib, "total_per_device_gib": sum(gib.values())}


def print_plan(plan: dict[str, Any]) -> None:
    print(f"\nmemory plan: {plan['model']}, {plan['method']}, {plan['strategy']} on {plan['devices']} device(s); "
          f"{plan['parameters'] / 1e9:.2f} B parameters, {plan['quantized_weights'] / 1e9:.2f} B quantized")
    width = max(len(k) for k in plan["per_device_gib"])
    for k, v in plan["per_device_gib"].items():
        print(f"  {k:<{width}}  {v:8.2f} GiB")
    print(f"  {'total per device':<{width}}  {plan['total_per_device_gib']:8.2f} GiB\n", flush=True)
