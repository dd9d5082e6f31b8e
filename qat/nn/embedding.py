"""The embedding and the LM head in few bits: `quantize.embedding` = fp32 | fp16 | int8 | int4.

In a 1-bit model the embedding is the largest tensor left (SmolLM2-135M: 28.3 M of its 134.5 M
parameters, tied with the head); kept in fp32 it is three quarters of the export. int8 / int4
store it as symmetric per-row codes with one fp16 scale per row (exact in ggml's Q8_0 / Q4_0).

Training form: the matrices are set to the values the packed form stores (`snap_embeddings`)
and stay frozen, so the fake-quant model and the packed model compute the same thing.
Inference form: `QuantEmbedding` (a row gather) and `QuantHead` (the head's product through
the `qat::int_row_gemm` op; a tied head reads the embedding's tensors, stored once).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from qat.errors import check_choice
from qat.kernels import ops
from qat.kernels.reference import int_row_weight
from qat.quant.kbit import pack_nibbles, symmetric_row_codes, symmetric_row_params

EMBEDDING_FORMATS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}


def check_embedding_format(fmt: str) -> int:
    check_choice("quantize.embedding", fmt, list(EMBEDDING_FORMATS))
    return EMBEDDING_FORMATS[fmt]


def quantize_matrix(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(codes, scale fp16 [rows]): int8 codes [rows, cols], or uint8 nibbles [rows, cols/2] at 4 bits."""
    scale = symmetric_row_params(w, bits)
    codes = symmetric_row_codes(w, scale, bits)
    return (pack_nibbles(codes) if bits == 4 else codes), scale


def stored_values(w: Tensor, fmt: str) -> Tensor:
    """The values a matrix has once stored in `fmt` (fp32: unchanged)."""
    bits = EMBEDDING_FORMATS[fmt]
    if bits == 32:
        return w
    if bits == 16:
        return w.half().to(w.dtype)
    return int_row_weight(*quantize_matrix(w, bits), bits).to(w.dtype)


def head_module(model: nn.Module) -> tuple[str | None, nn.Module | None]:
    """(name, module) of the output head, or (None, None)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get else None
    if head is None:
        return None, None
    return next(n for n, m in model.named_modules() if m is head), head


def embedding_module(model: nn.Module) -> tuple[str, nn.Embedding]:
    emb = model.get_input_embeddings()
    return next(n for n, m in model.named_modules() if m is emb), emb


def is_tied(model: nn.Module) -> bool:
    _, head = head_module(model)
    emb = model.get_input_embeddings()
    return head is not None and getattr(head, "weight", None) is emb.weight


@torch.no_grad()
def snap_embeddings(model: nn.Module, fmt: str) -> list[str]:
    """Training form: set the embedding (and an unquantized nn.Linear head without bias) to the
    values `fmt` stores, in place. Returns the names of the matrices it set."""
    check_embedding_format(fmt)
    done = []
    name, emb = embedding_module(model)
    emb.weight.copy_(stored_values(emb.weight, fmt))
    done.append(name)
    head_name, head = head_module(model)
    if head is not None and not is_tied(model) and type(head) is nn.Linear and head.bias is None:
        head.weight.copy_(stored_values(head.weight, fmt))
        done.append(head_name)
    return done


class QuantEmbedding(nn.Module):
    """nn.Embedding with int8 / int4 rows: codes + one fp16 scale per row."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, codes: Tensor, scale: Tensor,
                 padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.bits, self.padding_idx = (
            num_embeddings, embedding_dim, bits, padding_idx)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        # 0 elements under the plain weight's name: transformers without qat refuses the export
        self.register_buffer("weight", torch.empty(0, device=codes.device))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int) -> QuantEmbedding:
        codes, scale = quantize_matrix(emb.weight.detach(), bits)
        return cls(emb.num_embeddings, emb.embedding_dim, bits, codes, scale, emb.padding_idx)

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        rows = int_row_weight(self.codes.index_select(0, flat), self.scale.index_select(0, flat), self.bits)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.bits} per row"


class QuantHead(nn.Module):
    """The LM head y = x·Wᵀ with W in int8 / int4 rows. Tied: W is the QuantEmbedding's (read
    through it, stored once); untied: its own codes and scales."""

    def __init__(self, in_features: int, out_features: int, bits: int, tied_to: QuantEmbedding | None = None,
                 codes: Tensor | None = None, scale: Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        # a plain attribute, not a submodule: the tensors are stored once, under the embedding's name
        object.__setattr__(self, "tied_to", tied_to)
        if tied_to is None:
            self.register_buffer("codes", codes)
            self.register_buffer("scale", scale)
            self.register_buffer("weight", torch.empty(0, device=codes.device))

    def tensors(self) -> tuple[Tensor, Tensor]:
        src = self.tied_to if self.tied_to is not None else self
        return src.codes, src.scale

    def forward(self, x: Tensor) -> Tensor:
        codes, scale = self.tensors()
        return ops.int_row_gemm(x, codes, scale, self.bits, self.in_features)

    def extra_repr(self) -> str:
        tied = self.tied_to is not None
        return f"in={self.in_features}, out={self.out_features}, int{self.bits} per row, tied={tied}"


@torch.no_grad()
def convert_embeddings(model: nn.Module, fmt: str) -> dict[str, object]:
    """Inference form: the embedding (and the head, tied or an unquantized nn.Linear without bias)
    as QuantEmbedding / QuantHead at int8 / int4; fp32 / fp16 keep their modules (fp16: the export
    stores them in fp16). Returns what the export's config records to rebuild them."""
    bits = check_embedding_format(fmt)
    emb_name, emb = embedding_module(model)
    head_name, head = head_module(model)
    tied = is_tied(model)
    record: dict[str, object] = {"format": fmt, "embedding": emb_name, "head": None, "tied": tied}
    if bits >= 16:
        return record
    from qat.nn.qat_linear import set_submodule

    q = QuantEmbedding.from_embedding(emb, bits)
    if tied:
        set_submodule(model, emb_name, q)
        set_submodule(model, head_name, QuantHead(head.in_features, head.out_features, bits, tied_to=q))
        record["head"] = head_name
    else:
        set_submodule(model, emb_name, q)
        if type(head) is nn.Linear and head.bias is None:
            codes, scale = quantize_matrix(head.weight.detach(), bits)
            set_submodule(model, head_name, QuantHead(head.in_features, head.out_features, bits,
                                                      codes=codes, scale=scale))
            record["head"] = head_name
    return record


def rebuild_embeddings(model: nn.Module, record: dict, vocab: int, dim: int, device: str | torch.device = "cpu"
                       ) -> None:
    """Swap in empty QuantEmbedding / QuantHead modules of the recorded shapes (an export's loader
    fills them): the inverse of convert_embeddings' module swap."""
    from qat.nn.qat_linear import set_submodule

    bits = EMBEDDING_FORMATS[record["format"]]
    if bits >= 16:
        return
    old = model.get_submodule(record["embedding"])
    width = dim // 2 if bits == 4 else dim
    code_dtype = torch.uint8 if bits == 4 else torch.int8
    q = QuantEmbedding(vocab, dim, bits, torch.empty(vocab, width, dtype=code_dtype, device=device),
                       torch.empty(vocab, dtype=torch.float16, device=device), getattr(old, "padding_idx", None))
    set_submodule(model, record["embedding"], q)
    if record["head"]:
        head = model.get_submodule(record["head"])
        n_out = head.out_features
        if record["tied"]:
            set_submodule(model, record["head"], QuantHead(dim, n_out, bits, tied_to=q))
        else:
            set_submodule(model, record["head"], QuantHead(
                dim, n_out, bits, codes=torch.empty(n_out, width, dtype=code_dtype, device=device),
                scale=torch.empty(n_out, dtype=torch.float16, device=device)))
