"""GGUF export: the packed model as a file llama.cpp runs.

    python -m qat.export.gguf RUN_DIR [--out FILE] [--float-type auto|f32|f16|q8_0|q4_0]

RUN_DIR is a run folder (its export/ is read), an export folder, or a plain Hugging Face Llama
folder (e.g. the fp model, for baselines). Every tensor is written in the most compact ggml type
that holds what the packed layer stores exactly (Q4_1's offset up to fp16 rounding, reported):

  binary weights (rtn_binary, pbllm_qat with salient_ratio=0), rows a multiple of 128  -> Q1_0
  binary weights whose rows are not (SmolLM2's 576): ±d as q = 9 / 7 of Q4_0            -> Q4_0
  gptq at 2-4 bits, per row or groups of a multiple of 32: d = s, m = −z·s (fp16)        -> Q4_1
  embedding / untied head: quantize.embedding int8 -> Q8_0, int4 -> Q4_0, fp16 -> F16
  norms -> F32; other float matrices as stored (fp16 -> F16, fp32 -> F32), or --float-type

What ggml cannot represent (PB-LLM's salient values, dynamic groups, W(1+1)'s two scales,
quantized activations, smoothing's input scales) is one clear error, never a file that loads and
computes something else. Q/K rows are permuted into llama.cpp's rotary order; the tokenizer comes
from the GGUF the model was loaded from (the embedded default) or from a byte-level BPE
tokenizer.json. The file is written under a temporary name and renamed.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qat.errors import QATError, check_choice
from qat.export import ggml_blocks as blocks
from qat.io import atomic_file

FLOAT_TYPES = ["auto", "f32", "f16", "q8_0", "q4_0"]

# Hugging Face Llama names -> llama.cpp's
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_CANNOT = {
    "dyngroup": "its weights take one of G learned levels chosen per weight by stored group ids",
    "w11a14": "each weight picks one of two scales by a stored group bit, and its activations are "
              "INT4 bit planes",
}
_INSTEAD = ("export a pure binary run (experiment=q1_0: pbllm_qat with salient_ratio=0, or "
            "rtn_binary) or a gptq run with bits<=4, or run this model through qat's own kernels "
            "(qat.export.load_export)")


@dataclass
class Source:
    """What the exporter reads: a folder's config and tensors (packed ones as stored)."""

    folder: Path
    config: dict[str, Any]
    tensors: dict[str, Tensor]

    @property
    def qcfg(self) -> dict[str, Any]:
        return self.config.get("quantization_config") or {}


@dataclass
class GGUFTensor:
    name: str
    ggml_type: str   # "Q1_0", "Q4_0", "Q4_1", "Q8_0", "F16", "F32"
    data: np.ndarray  # float32 / float16 values, or the blocks' bytes (uint8 [rows, bytes])
    shape: tuple[int, ...]  # (rows, columns) as in PyTorch
    source: str      # what it was in the export (e.g. "binary per row", "int8 rows")
    max_abs_change: float = 0.0  # largest |value written − value stored|: 0 where exact

    @property
    def params(self) -> int:
        return int(np.prod(self.shape))


# -- reading ------------------------------------------------------------------------------------
def read_source(path: Path) -> Source:
    """A run folder (reads its export/), an export folder or an HF model folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise QATError(f"{path}: no such folder (expected a run folder, its export/ or a model folder)")
    folder = path / "export" if (path / "export" / "config.json").exists() else path
    cfg_path = folder / "config.json"
    files = sorted(folder.glob("*.safetensors"))
    if not cfg_path.exists() or not files:
        raise QATError(f"{path} is not a run, export or model folder (needs config.json and *.safetensors)")
    from safetensors import SafetensorError, safe_open

    try:
        config = json.loads(cfg_path.read_text())
        tensors: dict[str, Tensor] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                tensors.update({k: st.get_tensor(k) for k in st.keys()})
    except (OSError, ValueError, SafetensorError) as e:
        raise QATError(f"{folder} is corrupt: {str(e).splitlines()[0]}") from None
    return Source(folder, config, tensors)


def check_architecture(config: dict[str, Any]) -> None:
    """The model must be a plain Llama (what the exporter writes)."""
    if config.get("model_type") != "llama":
        raise QATError(f"GGUF export writes the Llama architecture (model_type=llama); this model is "
                       f"model_type={config.get('model_type')!r}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise QATError(f"rope_type={rope.get('rope_type')!r}: the GGUF exporter writes plain rotary "
                       "embeddings only (rope_type=default)")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise QATError("the model has linear biases; the GGUF exporter writes bias-free Llama models")


def check_method(method: str, params: dict[str, Any]) -> None:
    """One clear error for a method or setting llama.cpp cannot represent (checked by train.py
    before a run with export.gguf=true starts, and by the exporter before it writes)."""
    setting = f"method={method}"
    if method in _CANNOT:
        raise QATError(f"{setting} cannot be written to GGUF: {_CANNOT[method]}, and no ggml type "
                       f"represents that; {_INSTEAD}")
    if method == "pbllm_qat" and params.get("salient_ratio", 0) > 0:
        raise QATError(f"{setting} salient_ratio={params['salient_ratio']} cannot be written to GGUF: its "
                       f"{params.get('salient_bits')}-bit salient weights at stored positions have no ggml type; "
                       f"{_INSTEAD}")
    if method == "gptq" and params.get("bits", 4) > 4:
        raise QATError(f"{setting} bits={params['bits']}: codes of 8 bits with a zero point have no exact ggml "
                       "type (Q8_0 is symmetric); export bits<=4 (Q4_1)")
    if method not in ("pbllm_qat", "rtn_binary", "gptq", "fp16"):
        raise QATError(f"{setting} has no GGUF writer; {_INSTEAD}")
    if params.get("act_bits", 16) < 16:
        raise QATError(f"{setting} act_bits={params['act_bits']}: llama.cpp quantizes activations its own way "
                       "(Q8_0), so a model trained on INT-k activations would compute something else; "
                       "export a run with act=none (act_bits=16)")
    if params.get("smooth"):
        raise QATError(f"{setting} smooth=true: smoothing divides some layers' inputs by stored factors "
                       "(where no norm absorbs them) and llama.cpp has no such op; export a run with "
                       "smooth=none")


def check_layer(name: str, in_features: int, group_size: int) -> None:
    """Rows (in_features) and scale groups must be whole ggml blocks of 32 (Q4_0 / Q4_1; Q1_0 wants 128)."""
    group = group_size or in_features
    if in_features % 32 or group % 32:
        raise QATError(f"{name}: rows of {in_features} with " + (f"groups of {group_size}" if group_size else
                       "one scale per row") + " are not whole ggml blocks of 32 columns, so no ggml type holds "
                       "them exactly" + ("; use method.group_size=0 or a multiple of 32" if group_size else ""))


def check_run(method: str, params: dict[str, Any], model_config: dict[str, Any], layers: dict[str, int],
              embedding: str, tokenizer: Any, pre: str | None = None) -> None:
    """What export.gguf=true would refuse after training, checked before the run starts: the
    architecture, the method, every quantized layer's shape (`layers`: name -> in_features), the
    embedding's rows and the tokenizer (None: it comes from the source GGUF)."""
    check_architecture(model_config)
    check_method(method, params)
    if method != "fp16":
        for name, in_features in layers.items():
            check_layer(name, in_features, int(params.get("group_size", 0) or 0))
    if embedding in ("int8", "int4") and model_config["hidden_size"] % 32:
        raise QATError(f"quantize.embedding={embedding}: rows of {model_config['hidden_size']} are not whole "
                       "ggml blocks of 32; use quantize.embedding=fp16")
    if tokenizer is not None:
        from qat.models.tokenizer import ByteTokenizer, hf_byte_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            (hf_byte_tokenizer() if isinstance(tokenizer, ByteTokenizer) else tokenizer).save_pretrained(tmp)
            tokenizer_files_keys(Path(tmp), model_config["vocab_size"], pre)


def check_exportable(src: Source) -> None:
    """Everything the file could not hold, before anything is written."""
    check_architecture(src.config)
    if any(k.endswith(".bias") for k in src.tensors):
        raise QATError("the model has linear biases; the GGUF exporter writes bias-free Llama models")
    q = src.qcfg
    if q and q.get("quant_method") != "qat":
        raise QATError(f"quantization_config quant_method={q.get('quant_method')!r}: only qat exports are read")
    if q:
        check_method(q["method"], q.get("params", {}))


# -- tensors --------------------------------------------------------------------------------------
def gguf_name(hf_name: str) -> str:
    """`model.layers.3.mlp.down_proj` -> `blk.3.ffn_down` (no suffix)."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise QATError(f"tensor {hf_name!r} has no place in a Llama GGUF")


def rotary_row_order(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order of Q / K in llama.cpp: HF's halves-rotation [h, 2, d/2] read as [h, d/2, 2]
    (what llama.cpp's HF converter does to these rows)."""
    return np.arange(n_rows).reshape(n_heads, 2, n_rows // n_heads // 2).swapaxes(1, 2).reshape(-1)


def _fp16(x: Tensor) -> np.ndarray:
    return x.to(torch.float16).numpy()


def binary_tensor(name: str, signs: Tensor, scales: Tensor, in_features: int, rows: np.ndarray) -> GGUFTensor:
    """alpha·(±1) per row or column group: Q1_0 where every 128-block lies in one group, else Q4_0."""
    from qat.quant.packing import unpack_bits

    bits = unpack_bits(signs, in_features).numpy()[rows]
    s = _fp16(scales)[rows]
    shape = (bits.shape[0], in_features)
    kind = "binary per row" if s.shape[1] == 1 else f"binary, groups of {in_features // s.shape[1]}"
    d = blocks.block_scales(s, in_features, 128)
    if d is not None:
        return GGUFTensor(name, "Q1_0", blocks.q1_0(bits, d), shape, kind)
    d = blocks.block_scales(s, in_features, 32)
    if d is None:
        raise QATError(f"{name}: binary rows of {in_features} with {kind} fit neither Q1_0 (blocks of 128) nor "
                       "Q4_0 (blocks of 32); use method.group_size=0 or a multiple of 32 that divides the rows")
    return GGUFTensor(name, "Q4_0", blocks.q4_0(np.where(bits, 9, 7), d), shape, kind)


def kbit_tensor(name: str, packed: dict[str, Tensor], bits: int, in_features: int, rows: np.ndarray) -> GGUFTensor:
    """GPTQ's (q − z)·s at <= 4 bits as Q4_1 (d = s, m = −z·s): the offset is rounded to fp16."""
    from qat.quant.kbit import unpack_codes

    codes = unpack_codes(packed["codes"], bits, in_features).numpy()[rows]
    s, z = packed["scale"].float().numpy()[rows], packed["zero"].float().numpy()[rows]
    d = blocks.block_scales(s.astype(np.float16), in_features, 32)
    if d is None:
        raise QATError(f"{name}: gptq groups of {in_features // s.shape[1]} columns are not whole Q4_1 blocks of 32")
    m_exact = blocks.block_scales(-z * s, in_features, 32)
    m = m_exact.astype(np.float16)
    change = float(np.abs(m.astype(np.float32) - m_exact).max())
    return GGUFTensor(name, "Q4_1", blocks.q4_1(codes, d, m), codes.shape, f"gptq {bits}-bit", change)


def int_rows_tensor(name: str, codes: Tensor, scale: Tensor, bits: int) -> GGUFTensor:
    """quantize.embedding int8 / int4: one fp16 scale per row -> Q8_0 / Q4_0 with d repeated."""
    from qat.quant.kbit import unpack_nibbles

    q = (unpack_nibbles(codes) if bits == 4 else codes).numpy()
    n = q.shape[1]
    if n % 32:
        raise QATError(f"{name}: rows of {n} are not whole ggml blocks of 32; use quantize.embedding=fp16")
    d = np.repeat(_fp16(scale)[:, None], n // 32, axis=1)
    if bits == 8:
        return GGUFTensor(name, "Q8_0", blocks.q8_0(q, d), q.shape, "int8 rows")
    return GGUFTensor(name, "Q4_0", blocks.q4_0(q.astype(np.int16) + 8, d), q.shape, "int4 rows")


def float_tensor(name: str, t: Tensor, float_type: str, rows: np.ndarray | None) -> GGUFTensor:
    """Norms F32; matrices as stored (auto) or converted (f32 / f16 / q8_0 / q4_0 by gguf's quantizer)."""
    stored = str(t.dtype).removeprefix("torch.")
    a = t.float().numpy()
    if rows is not None:
        a = a[rows]
    if a.ndim == 1:
        return GGUFTensor(name, "F32", a, a.shape, stored)
    ftype = {"auto": "f16" if t.dtype == torch.float16 else "f32"}.get(float_type, float_type)
    if ftype == "f32":
        return GGUFTensor(name, "F32", a, a.shape, stored)
    if ftype == "f16":
        h = a.astype(np.float16)
        return GGUFTensor(name, "F16", h, a.shape, stored, float(np.abs(h.astype(np.float32) - a).max()))
    import gguf

    qtype = gguf.GGMLQuantizationType[ftype.upper()]
    try:
        data = gguf.quants.quantize(a, qtype)
    except gguf.quants.QuantError as e:
        raise QATError(f"{name}: --float-type {float_type}: {e}") from None
    change = float(np.abs(gguf.quants.dequantize(data, qtype) - a).max())
    return GGUFTensor(name, ftype.upper(), data, a.shape, stored, change)


def gguf_tensors(src: Source, float_type: str = "auto") -> list[GGUFTensor]:
    """Every tensor of the Llama GGUF, converted from the export (tied: the embedding once)."""
    cfg, q = src.config, src.qcfg
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    layers = q.get("layers", {})
    emb = q.get("embedding") or {}
    bits = {"int8": 8, "int4": 4}.get(emb.get("format"))
    quantized_rows = {emb.get("embedding"), emb.get("head")} if bits else set()
    tensors = {k: v for k, v in src.tensors.items() if v.numel()}  # packed modules keep an empty .weight
    if cfg.get("tie_word_embeddings") and "lm_head.weight" in tensors:
        # tied: llama.cpp reads the embedding as the head when the file has no output.weight
        head = tensors.pop("lm_head.weight")
        tensors.setdefault("model.embed_tokens.weight", head)
    by_module: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        module, _, part = key.rpartition(".")
        by_module.setdefault(module, {})[part] = value
    rotary_heads = {"q_proj": n_head, "k_proj": n_kv}  # rows llama.cpp wants in its rotary order
    out = []
    for module in sorted(by_module, key=_natural):
        name, t = gguf_name(module) + ".weight", by_module[module]
        heads, rows = rotary_heads.get(module.rpartition(".")[2]), None
        if heads:
            rows = rotary_row_order(layers[module][0] if module in layers else t["weight"].shape[0], heads)
        if module in layers:
            out_f, in_f = layers[module]
            rows = np.arange(out_f) if rows is None else rows
            known = {"codes", "scale", "zero"} if q["method"] == "gptq" else {"signs", "scales"}
            if set(t) - known:
                raise QATError(f"{module} stores {sorted(set(t) - known)}, which no ggml type holds")
            if q["method"] == "gptq":
                out.append(kbit_tensor(name, t, q["params"].get("bits", 4), in_f, rows))
            else:
                out.append(binary_tensor(name, t["signs"], t["scales"], in_f, rows))
        elif module in quantized_rows:
            out.append(int_rows_tensor(name, t["codes"], t["scale"], bits))
        elif set(t) == {"weight"}:
            out.append(float_tensor(name, t["weight"], float_type, rows))
        else:
            raise QATError(f"{module} stores {sorted(t)}, which the GGUF exporter does not know")
    return out


def _natural(s: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


# -- metadata ------------------------------------------------------------------------------------
def llama_metadata(cfg: dict[str, Any]) -> dict[str, Any]:
    """The `llama.*` keys llama.cpp reads, from a transformers LlamaConfig dict, named as
    GGUFWriter's add_<name> methods."""
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    return {
        "context_length": cfg.get("max_position_embeddings", 2048),
        "embedding_length": cfg["hidden_size"],
        "block_count": cfg["num_hidden_layers"],
        "feed_forward_length": cfg["intermediate_size"],
        "head_count": heads,
        "head_count_kv": cfg.get("num_key_value_heads") or heads,
        "rope_freq_base": float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        "layer_norm_rms_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "rope_dimension_count": head_dim,
        "key_length": head_dim,
        "value_length": head_dim,
        "vocab_size": cfg["vocab_size"],
    }


def source_gguf(src: Source) -> Path | None:
    """The GGUF the model was loaded from, when it was (the embedded default): its tokenizer keys
    are carried over as they are."""
    from qat.models.load import EMBEDDED_NAME, embedded_cache_path, embedded_default_gguf

    # exports record where the model came from (older ones only its name)
    from_embedded = src.config.get("qat_model_source", "embedded" if src.config.get("qat_model_name") == EMBEDDED_NAME
                                   else None) == "embedded"
    if not from_embedded and src.folder.resolve() != embedded_cache_path().resolve():
        return None
    return embedded_default_gguf()


TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5  # llama.cpp's token types


def bpe_tokenizer_keys(tok: dict[str, Any], special: dict[str, Any], n_rows: int, pre: str | None
                       ) -> dict[str, Any]:
    """The `tokenizer.ggml.*` values of a byte-level BPE tokenizer (a tokenizer.json `tok` and its
    tokenizer_config.json `special`), padded to the embedding's `n_rows`; one clear error for any
    tokenizer llama.cpp would read differently."""
    model = tok.get("model") or {}
    decoder = (tok.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or decoder != "ByteLevel":
        raise QATError(f"a {model.get('type')} tokenizer with a {decoder} decoder: the GGUF exporter writes "
                       "byte-level BPE (gpt2-style) tokenizers only")
    vocab = dict(model["vocab"])
    added = {a["content"]: a for a in tok.get("added_tokens", [])}
    vocab.update({text: a["id"] for text, a in added.items()})
    if max(vocab.values()) >= n_rows:
        raise QATError(f"the tokenizer has ids up to {max(vocab.values())} but the embedding only {n_rows} rows")
    tokens = [f"[PAD{i}]" for i in range(n_rows)]  # rows no token uses (a padded embedding), as llama.cpp's converter
    types = [TOKEN_UNUSED] * n_rows
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = (TOKEN_CONTROL if added[text]["special"] else TOKEN_USER_DEFINED) if text in added else TOKEN_NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not pre:
        pre_tok = tok.get("pre_tokenizer") or {}
        if not merges:
            pre = "default"  # bytes only (the tiny test model): every byte is a token however text is split
        elif pre_tok.get("type") == "ByteLevel" and pre_tok.get("use_regex", True):
            pre = "gpt2"  # GPT-2's own split, which llama.cpp calls gpt2
        else:
            raise QATError(f"the tokenizer splits text with a {pre_tok.get('type')} pre-tokenizer, which llama.cpp "
                           "knows by a name this exporter cannot infer: pass --pre NAME (export.gguf_pre=NAME), "
                           "e.g. llama-bpe, qwen2, smollm, as llama.cpp's convert_hf_to_gguf.py names it")
    if not merges and added:
        # a bytes-only vocabulary: llama.cpp refuses a BPE vocab without merges and gguf cannot write
        # an empty array; a merge of two special tokens never applies to text
        merges = [f"{next(iter(added))} {next(iter(added))}"]

    def token_id(key: str) -> int | None:
        text = special.get(key)
        text = text.get("content") if isinstance(text, dict) else text
        return vocab.get(text)

    # BOS added by the tokenizer: tokenizer_config's add_bos_token, or a special token ahead of the
    # sequence in the post-processor's template (Llama-3 style)
    single = (tok.get("post_processor") or {}).get("single") or []
    template_bos = single[0]["SpecialToken"]["id"] if single and "SpecialToken" in single[0] else None
    bos = token_id("bos_token") if template_bos is None else vocab.get(template_bos)
    add_bos = bool(special.get("add_bos_token", template_bos is not None))
    eos = token_id("eos_token")
    if eos is None:
        raise QATError("the tokenizer names no end-of-text token (tokenizer_config.json eos_token): llama.cpp "
                       "would stop generating at an arbitrary one")
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre, "bos": bos, "eos": eos,
            "pad": token_id("pad_token"), "add_bos": add_bos}


def tokenizer_files_keys(folder: Path, n_rows: int, pre: str | None) -> dict[str, Any]:
    """bpe_tokenizer_keys of a folder's tokenizer.json + tokenizer_config.json."""
    path = folder / "tokenizer.json"
    if not path.exists():
        raise QATError(f"{folder} has no tokenizer.json and the model did not come from a GGUF: "
                       "the GGUF would have no tokenizer")
    config = folder / "tokenizer_config.json"
    try:
        return bpe_tokenizer_keys(json.loads(path.read_text()), json.loads(config.read_text()) if config.exists()
                                  else {}, n_rows, pre)
    except QATError as e:
        raise QATError(f"{path}: {e}") from None
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise QATError(f"{path} is not a tokenizer.json this exporter can read ({type(e).__name__}: {e})") from None


def add_tokenizer(writer: Any, src: Source, pre: str | None) -> str:
    """Write `tokenizer.*`: copied from the source GGUF, else built from the folder's byte-level BPE
    tokenizer.json. Returns where it came from."""
    import gguf

    from_gguf = source_gguf(src)
    if from_gguf is not None:
        reader = gguf.GGUFReader(str(from_gguf))
        for key, field in reader.fields.items():
            if key.startswith("tokenizer."):
                main, sub = field.types[0], (field.types[-1] if len(field.types) > 1 else None)
                writer.add_key_value(key, field.contents(), main, sub)
        return f"tokenizer from {from_gguf.name}"
    keys = tokenizer_files_keys(src.folder, src.config["vocab_size"], pre)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(keys["pre"])
    writer.add_token_list(keys["tokens"])
    writer.add_token_types(keys["types"])
    writer.add_token_merges(keys["merges"])
    writer.add_eos_token_id(keys["eos"])
    if keys["bos"] is not None:
        writer.add_bos_token_id(keys["bos"])
    if keys["pad"] is not None:
        writer.add_pad_token_id(keys["pad"])
    writer.add_add_bos_token(keys["add_bos"])
    return f"tokenizer from tokenizer.json (pre-tokenizer {keys['pre']!r})"


# -- writing --------------------------------------------------------------------------------------
def file_type(tensors: list[GGUFTensor]) -> int:
    """general.file_type: the type holding most of the matrices' weights."""
    import gguf

    weights: dict[str, int] = {}
    for t in tensors:
        if len(t.shape) == 2:
            weights[t.ggml_type] = weights.get(t.ggml_type, 0) + t.params
    main = max(weights, key=weights.get)
    return int(gguf.LlamaFileType["ALL_F32" if main == "F32" else f"MOSTLY_{main}"])


def default_out(path: Path) -> Path:
    """RUN/model.gguf for a run folder or its export/; FOLDER/model.gguf for a model folder."""
    return path.parent / "model.gguf" if path.name == "export" and (path / "config.json").exists() \
        else path / "model.gguf"


def write_gguf(path: Path, out: Path | None = None, float_type: str = "auto", pre: str | None = None
               ) -> dict[str, Any]:
    """Export `path` (run / export / model folder) to a GGUF file; returns the report: the file,
    its bytes, parameters, bits per weight of the whole file and the per-tensor table."""
    import gguf

    check_choice("--float-type", float_type, FLOAT_TYPES)
    path = Path(path).expanduser()
    src = read_source(path)
    check_exportable(src)
    tensors = gguf_tensors(src, float_type)
    out = default_out(path) if out is None else Path(out).expanduser()
    out = out / "model.gguf" if out.is_dir() else out
    if not out.parent.is_dir():
        raise QATError(f"--out {out}: folder {out.parent} does not exist")
    writer = None
    try:
        with atomic_file(out) as tmp:
            writer = gguf.GGUFWriter(str(tmp), "llama")
            writer.add_name(str(src.config.get("qat_model_name") or src.folder.name))
            for key, value in llama_metadata(src.config).items():  # each key is a GGUFWriter.add_<key>
                getattr(writer, f"add_{key}")(value)
            writer.add_file_type(file_type(tensors))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            tokenizer = add_tokenizer(writer, src, pre)
            for t in tensors:
                raw = None if t.ggml_type in ("F16", "F32") else gguf.GGMLQuantizationType[t.ggml_type]
                writer.add_tensor(t.name, t.data, raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            writer = None
    except OSError as e:
        raise QATError(f"could not write {out}: {e.strerror or e}") from None
    finally:
        if writer is not None:  # the failure was inside the writer: release its file
            writer.close()
    n_params = sum(t.params for t in tensors)
    size = out.stat().st_size
    return {"file": str(out), "bytes": size, "parameters": n_params, "bits_per_weight": size * 8 / n_params,
            "tokenizer": tokenizer,
            "tensors": [{"name": t.name, "type": t.ggml_type, "shape": list(t.shape), "from": t.source,
                         "max_abs_change": t.max_abs_change} for t in tensors]}


def type_shares(report: dict[str, Any]) -> dict[str, float]:
    """Share of the file's parameters held in each ggml type."""
    shares: dict[str, float] = {}
    for t in report["tensors"]:
        shares[t["type"]] = shares.get(t["type"], 0.0) + int(np.prod(t["shape"])) / report["parameters"]
    return {k: round(v, 4) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}


def summary_table(report: dict[str, Any]) -> str:
    """The per-tensor table, one line per tensor role (blk.N.ffn_down...) and type."""
    rows: dict[tuple[str, str, str], list[int]] = {}
    for t in report["tensors"]:
        role = re.sub(r"^blk\.\d+\.", "blk.*.", t["name"])
        key = (role, t["type"], t["from"])
        r = rows.setdefault(key, [0, 0])
        r[0] += 1
        r[1] += int(np.prod(t["shape"]))
    lines = [f"{'tensor':<24} {'type':<5} {'count':>5} {'params':>11} {'share':>6}  from"]
    for (role, typ, frm), (count, params) in rows.items():
        share = 100 * params / report["parameters"]
        lines.append(f"{role:<24} {typ:<5} {count:>5} {params:>11,} {share:>5.1f}%  {frm}")
    lines.append(f"{report['file']}: {report['bytes'] / 1e6:.1f} MB, {report['parameters']:,} parameters, "
                 f"{report['bits_per_weight']:.3f} bits per weight; {report['tokenizer']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qat.export.gguf", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a run folder, its export/ folder, or a Hugging Face Llama folder")
    p.add_argument("--out", help="the GGUF file (default: PATH/model.gguf)")
    p.add_argument("--float-type", default="auto", help=f"unquantized matrices: {' | '.join(FLOAT_TYPES)} "
                   "(auto: as stored; q8_0 / q4_0 quantize them with gguf's quantizer, not exactly)")
    p.add_argument("--pre", help="llama.cpp's pre-tokenizer name for a tokenizer.json (default: 'default')")
    args = p.parse_args(argv)
    try:
        report = write_gguf(Path(args.path), args.out and Path(args.out), args.float_type, args.pre)
    except QATError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
