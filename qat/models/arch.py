"""What the PTQ engine, smoothing, reconstruction and sharding need to know about an architecture,
written once per `config.model_type`: where the decoder layers are and, inside a layer, which
linears read the same input — in the order the layer computes them, with the norm (if any) whose
output they read.

Calibration quantizes group by group (each group's Hessian is taken after the earlier groups are
quantized); smoothing folds its factors into the group's norm and scales *every* reader's weights
(a skipped reader too: the smoothing defect was a copy of this table that forgot one).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qat.errors import QATError


@dataclass(frozen=True)
class ReaderGroup:
    norm: str | None            # the norm whose output the linears read; None: no norm between
    linears: tuple[str, ...]    # names inside a decoder layer


@dataclass(frozen=True)
class Architecture:
    layers: tuple[str, ...]     # where the decoder layers may be (the first that exists)
    groups: tuple[ReaderGroup, ...]


_LLAMA = Architecture(("model.layers",), (
    ReaderGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ReaderGroup(None, ("self_attn.o_proj",)),
    ReaderGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ReaderGroup(None, ("mlp.down_proj",)),
))
_OPT = Architecture(("model.decoder.layers",), (
    ReaderGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ReaderGroup(None, ("self_attn.out_proj",)),
    ReaderGroup("final_layer_norm", ("fc1",)),
    ReaderGroup(None, ("fc2",)),
))
ARCHITECTURES: dict[str, Architecture] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
                                          "opt": _OPT}


def architecture(model: nn.Module, what: str = "calibration") -> Architecture:
    """The model's entry of ARCHITECTURES; one clear error naming the known ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type not in ARCHITECTURES:
        raise QATError(f"{what} does not know model_type={model_type!r} (which linears read which input); "
                       f"known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, the decoder layers): from the model's architecture entry, else the usual paths."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    known = ARCHITECTURES[model_type].layers if model_type in ARCHITECTURES else ()
    for path in (*known, "model.layers", "model.decoder.layers"):
        try:
            return path, model.get_submodule(path)
        except AttributeError:
            continue
    raise QATError(f"no decoder layers found in {type(model).__name__} (model_type={model_type!r})")
