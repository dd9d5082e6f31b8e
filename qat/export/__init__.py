"""The inference form on disk: safetensors + config.json with a `quantization_config`.

`load_export(dir)` rebuilds the model from the folder alone (no training code path): the
architecture from config.json, each quantized layer as a PackedLinear from its stored tensors.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from qat.errors import QATError
from qat.io import atomic_dir
from qat.methods import build_method
from qat.models.tokenizer import ByteTokenizer, hf_byte_tokenizer
from qat.nn.embedding import (
    EMBEDDING_FORMATS,
    QuantEmbedding,
    QuantHead,
    embedding_module,
    head_module,
    rebuild_embeddings,
)
from qat.nn.packed_linear import PackedLinear
from qat.nn.qat_linear import set_submodule
from qat.quant.bits import tensor_bits

PACKED_MODULES = (PackedLinear, QuantEmbedding, QuantHead)


def unquantized_dtype(embedding_format: str) -> torch.dtype:
    """How the export stores every floating tensor that no method quantized (the embedding at
    fp16, skipped linears, an untied head, norms): fp32 only for quantize.embedding=fp32."""
    return torch.float32 if embedding_format == "fp32" else torch.float16


def _packed_prefixes(model: nn.Module) -> tuple[str, ...]:
    return tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, PACKED_MODULES))


@torch.no_grad()
def round_unquantized(model: nn.Module, embedding_format: str) -> None:
    """Round, in place, the tensors the export stores in fp16 to fp16 values (kept in their dtype),
    so that the model evaluated is the model stored."""
    dtype = unquantized_dtype(embedding_format)
    packed = _packed_prefixes(model)
    for name, p in model.named_parameters():
        if p.is_floating_point() and not name.startswith(packed):
            p.copy_(p.to(dtype).to(p.dtype))


def export_tensors(model: nn.Module, embedding_format: str = "fp32") -> dict[str, Tensor]:
    """The tensors the export stores, by name: every parameter and persistent buffer once (a tied
    matrix under one name), packed tensors as they are, the other floating parameters in
    `unquantized_dtype` (floating buffers, e.g. rotary frequencies, in fp32)."""
    dtype = unquantized_dtype(embedding_format)
    packed = _packed_prefixes(model)
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for name, t in model.state_dict(keep_vars=False).items():
        if t.numel() and t.data_ptr() in seen:
            continue  # tied: stored once (load_export and transformers tie it back)
        if t.numel():
            seen.add(t.data_ptr())
        t = t.detach()
        if not name.startswith(packed) and t.is_floating_point():
            t = t.to(dtype) if name in params else t.float()
        out[name] = t.contiguous()
    return out


def model_bits(tensors: dict[str, Tensor], n_parameters: int) -> float:
    """bits.model: every bit of the export's tensors over every parameter of the fp model."""
    return tensor_bits(tensors.values()) / n_parameters


def save_export(model: nn.Module, out_dir: Path, model_name: str, tokenizer: Any = None,
                embedding: dict | None = None, model_source: str | None = None) -> Path:
    """Write model.safetensors + config.json (+ the tokenizer's files, when it has them) to a temp
    folder, then rename it to out_dir. The config's quantization_config lists every packed
    tensor's shape and dtype, so that transformers can build the layers before loading (qat/hf.py).
    `embedding`: convert_embeddings' record (the embedding / head format; None: fp32, as they are)."""
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
    embedding = embedding or {"format": "fp32"}
    if qcfg and embedding["format"] != "fp32":
        qcfg["embedding"] = embedding
    config = model.config.to_dict()
    if qcfg:
        config["quantization_config"] = qcfg
    config["qat_model_name"] = model_name
    if model_source:  # embedded | hf | tiny: the GGUF export takes the embedded default's tokenizer from its GGUF
        config["qat_model_source"] = model_source
    with atomic_dir(out_dir) as tmp:
        save_file(export_tensors(model, embedding["format"]), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
        if isinstance(tokenizer, ByteTokenizer):  # the tiny test model's: as a transformers tokenizer
            tokenizer = hf_byte_tokenizer()
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
        raw.pop("qat_model_source", None)
        config = AutoConfig.for_model(**raw)
        # built for real (not on meta) so non-persistent buffers such as rotary frequencies
        # are computed by the architecture's own code
        model = AutoModelForCausalLM.from_config(config)
        with safe_open(str(weights), framework="pt", device=device) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, json.JSONDecodeError, SafetensorError) as e:  # truncated or garbled files
        raise QATError(f"export {export_dir} is corrupt: {str(e).splitlines()[0]}") from None
    if qcfg and qcfg.get("embedding"):
        rebuild_embeddings(model, qcfg["embedding"], config.vocab_size, config.hidden_size)
    if qcfg:
        method = build_method(qcfg["method"], **qcfg["params"])
        for name, (out_f, in_f) in qcfg["layers"].items():
            prefix = f"{name}."
            packed = {k[len(prefix):]: v for k, v in tensors.items()
                      if k.startswith(prefix) and k[len(prefix):] not in ("bias", "weight")}
            bias = tensors.get(f"{name}.bias")
            set_submodule(model, name, PackedLinear(in_f, out_f, method, packed, bias))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    emb_format = ((qcfg or {}).get("embedding") or {}).get("format", "fp32")
    # safetensors stores a tied matrix once, under either name (a quantized tied head reads the
    # embedding's tensors instead)
    if tied and EMBEDDING_FORMATS[emb_format] >= 16:
        emb, head = embedding_module(model)[0] + ".weight", head_module(model)[0] + ".weight"
        shared = tensors.get(emb, tensors.get(head))
        if shared is not None:
            tensors[emb] = tensors[head] = shared
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise QATError(f"export {export_dir} has tensors the model does not: {unexpected[:3]}")
    if missing:
        raise QATError(f"export {export_dir} lacks tensors: {missing[:3]}")
    fp32_unquantized(model)
    return model.to(device).eval()


def fp32_unquantized(model: nn.Module) -> None:
    """The export stores unquantized matrices in fp16; compute with them in fp32 (exact: the model
    was evaluated with the fp16 values), keeping tied parameters tied."""
    done: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, PACKED_MODULES):
            continue
        for name, p in list(m._parameters.items()):
            if p is not None and p.dtype in (torch.float16, torch.bfloat16):
                key = p.data_ptr()  # tied names may hold two Parameters over one tensor
                if key not in done:
                    done[key] = nn.Parameter(p.detach().float(), requires_grad=p.requires_grad)
                m._parameters[name] = done[key]
