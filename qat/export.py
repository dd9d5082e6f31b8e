"""The inference form on disk: safetensors + config.json with a `quantization_config`.

`load_export(dir)` rebuilds the model from the folder alone (no training code path): the
architecture from config.json, each quantized layer as a PackedLinear from its stored tensors.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model
from torch import nn

from qat.errors import QATError
from qat.fetch import atomic_dir
from qat.methods import build_method
from qat.nn.packed_linear import PackedLinear
from qat.nn.qat_linear import set_submodule


def save_export(model: nn.Module, out_dir: Path, model_name: str, tokenizer: Any = None) -> Path:
    """Write model.safetensors + config.json (+ the tokenizer's files, when it has them) to a temp
    folder, then rename it to out_dir. The config's quantization_config lists every packed
    tensor's shape and dtype, so that transformers can build the layers before loading (qat/hf.py)."""
    out_dir = Path(out_dir)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    methods = {type(m.method) for m in layers.values()}
    qcfg = None
    if layers:
        method = next(iter(layers.values())).method
        assert len(methods) == 1, "one method per export"
        qcfg = {"quant_method": "qat", "method": method.name,
                "params": dataclasses.asdict(method),
                "layers": {n: [m.out_features, m.in_features] for n, m in layers.items()},
                "tensors": {n: {t: [list(v.shape), str(v.dtype).removeprefix("torch.")]
                                for t, v in m.packed().items()} for n, m in layers.items()}}
    config = model.config.to_dict()
    if qcfg:
        config["quantization_config"] = qcfg
    config["qat_model_name"] = model_name
    with atomic_dir(out_dir) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(tmp))
    return out_dir


def load_export(export_dir: Path, device: str = "cpu") -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    export_dir = Path(export_dir)
    cfg_path, weights = export_dir / "config.json", export_dir / "model.safetensors"
    if not cfg_path.exists() or not weights.exists():
        raise QATError(f"{export_dir} is not an export folder (needs config.json and model.safetensors)")
    try:
        raw = json.loads(cfg_path.read_text())
        qcfg = raw.pop("quantization_config", None)
        raw.pop("qat_model_name", None)
        config = AutoConfig.for_model(**raw)
        # built for real (not on meta) so non-persistent buffers such as rotary frequencies
        # are computed by the architecture's own code
        model = AutoModelForCausalLM.from_config(config)
        with safe_open(str(weights), framework="pt", device=device) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, json.JSONDecodeError, SafetensorError) as e:  # truncated or garbled files
        raise QATError(f"export {export_dir} is corrupt: {str(e).splitlines()[0]}") from None
    if qcfg:
        method = build_method(qcfg["method"], **qcfg["params"])
        for name, (out_f, in_f) in qcfg["layers"].items():
            prefix = f"{name}."
            packed = {k[len(prefix):]: v for k, v in tensors.items()
                      if k.startswith(prefix) and k[len(prefix):] not in ("bias", "weight")}
            bias = tensors.get(f"{name}.bias")
            set_submodule(model, name, PackedLinear(in_f, out_f, method, packed, bias))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:  # safetensors stores a tied matrix once, under either name
        emb = next(n for n, m in model.named_modules() if m is model.get_input_embeddings()) + ".weight"
        head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings()) + ".weight"
        shared = tensors.get(emb, tensors.get(head))
        if shared is not None:
            tensors[emb] = tensors[head] = shared
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise QATError(f"export {export_dir} has tensors the model does not: {unexpected[:3]}")
    if missing:
        raise QATError(f"export {export_dir} lacks tensors: {missing[:3]}")
    return model.to(device).eval()
