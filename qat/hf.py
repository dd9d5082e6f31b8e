"""Exports load in plain transformers: `import qat`, then `AutoModelForCausalLM.from_pretrained(export)`.

The export's config.json carries `quantization_config = {"quant_method": "qat", method, params,
layers, tensors}`. This module registers that quant_method with transformers' own extension
points (`register_quantization_config`, `register_quantizer`): before the weights are read, the
quantizer swaps every listed nn.Linear for a PackedLinear with empty tensors of the stored
shapes, which transformers' loader then fills from model.safetensors. Without qat imported,
transformers would skip an unknown quant_method and leave random weights; the export therefore
also stores a 0-element `<layer>.weight` per quantized layer (PackedLinear.weight), which plain
transformers refuses as a size mismatch: a loud error, never random weights.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "qat"


@register_quantization_config(QUANT_METHOD)
class QatConfig(QuantizationConfigMixin):
    def __init__(self, method: str, params: dict, layers: dict, tensors: dict | None = None,
                 embedding: dict | None = None, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.method, self.params, self.layers, self.tensors = method, params, layers, tensors or {}
        self.embedding = embedding

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "method": self.method, "params": self.params,
                "layers": self.layers, "tensors": self.tensors,
                **({"embedding": self.embedding} if self.embedding else {})}


@register_quantizer(QUANT_METHOD)
class QatHfQuantizer(HfQuantizer):
    requires_calibration = True  # pre-quantized exports only: quantizing happens in train.py

    def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> None:
        from qat.methods import build_method
        from qat.nn.packed_linear import PackedLinear
        from qat.nn.qat_linear import set_submodule

        cfg = self.quantization_config
        if not cfg.tensors:
            raise ValueError("this qat export predates transformers loading (no tensor shapes in its "
                             "quantization_config): load it with qat.export.load_export")
        if cfg.embedding:  # int8 / int4 embedding and head (qat.nn.embedding)
            from qat.nn.embedding import rebuild_embeddings

            emb = model.get_input_embeddings()
            rebuild_embeddings(model, cfg.embedding, emb.num_embeddings, emb.embedding_dim, emb.weight.device)
            if cfg.embedding.get("head"):  # the QuantHead reads the embedding's tensors: nothing to tie
                model.all_tied_weights_keys = {}
        method = build_method(cfg.method, **cfg.params)
        for name, (out_f, in_f) in cfg.layers.items():
            old = model.get_submodule(name)
            device = old.weight.device
            packed = {t: torch.empty(shape, dtype=getattr(torch, dtype), device=device)
                      for t, (shape, dtype) in cfg.tensors[name].items()}
            bias = None if old.bias is None else torch.empty_like(old.bias, device=device)
            set_submodule(model, name, PackedLinear(in_f, out_f, method, packed, bias))

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        from qat.export import fp32_unquantized

        fp32_unquantized(model)  # matrices stored in fp16 compute in fp32, as they were evaluated
        return model.eval()

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return False  # written by qat.export.save_export

    @property
    def is_trainable(self) -> bool:
        return False
