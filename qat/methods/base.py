"""What a quantization method supplies to the generic QATLinear / PackedLinear.

A method is a small config object with four functions (and `act_bits`: its inputs' precision,
which QATLinear fake-quantizes with a learnable clipping factor and PackedLinear quantizes for real):
  init_state(weight, hessian)   -> buffers for the training form (the PTQ "rtn" seed)
  fake_quant(latent, buffers)   -> the weight the training form multiplies with (STE inside)
  pack(latent, buffers)         -> the tensors the inference form stores
  packed_linear(x, packed)      -> the inference form's output, through qat.kernels ops
and, optionally, derived(packed): tensors the kernels read that are functions of the stored ones
(computed once per layer by PackedLinear, never stored, so never counted in the bits).
The rest of the code asks a method through the hooks at the end of the class (data_free,
check_act_order, frozen_mask, refresh, report_fields), each with a default, never by its fields.
QATLinear and PackedLinear never look at a method's name.

With init=gptq_hessian a method also supplies a ColumnQuantizer (gptq_quantizer): the generic
GPTQ loop (qat.ptq.gptq) calls it column by column, and state_from_gptq turns the loop's
GPTQResult and the quantizer's record() into the QATLinear state. Both types live here, so that
qat.ptq imports qat.methods and never the other way round.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from qat.errors import QATError


@dataclass
class GPTQResult:
    """What the GPTQ loop returns for one matrix (original column order)."""
    quantized: Tensor     # Q: [out, in], the dequantized weights
    compensated: Tensor   # W': each column's value right before it was quantized
    hinv_diag: Tensor     # diagonal of the upper Cholesky factor of H^-1
    damp: float           # the damping that made H positive definite
    retries: int = 0


class ColumnQuantizer:
    """The per-method part of GPTQ. The loop calls begin_block once per block of columns, then
    column for each of them; afterwards record() is what state_from_gptq reads (the parameters
    and choices the quantizer made, as a small dataclass of the method's own)."""

    # True: the loop calls quantize_block once per block instead of column() per column, with no
    # error feedback between the block's columns (BiLLM); later blocks get the lazy update from
    # the errors quantize_block returns
    whole_block: bool = False
    # True: the loop calls refine() at its end (and keeps a copy of the starting weights for it)
    refits: bool = False

    def quantize_block(self, W1: Tensor, Hinv1: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
        """Quantize a whole block at its start: W1 its current weights, Hinv1 its square of the
        upper Cholesky factor of H⁻¹, cols its original column indices. Returns (Q1, Err1): the
        quantized block and the scaled errors the lazy update spreads over the later columns
        (the column loop's (w - q)/U_jj)."""
        raise NotImplementedError

    def begin_block(self, W: Tensor, i1: int, i2: int, cols: Tensor) -> None:
        """Fix per-block parameters. W is the whole matrix in GPTQ's column order as of this
        block's start (earlier blocks' lazy updates applied); cols = original column indices."""

    def column(self, w: Tensor, pos: int, col: int) -> Tensor:
        """Quantize the column at position `pos` of GPTQ's order (original index `col`)."""
        raise NotImplementedError

    def record(self) -> Any:
        """What the quantizer chose (scales, masks, ids): state_from_gptq's input."""
        raise NotImplementedError

    def refine(self, Q: Tensor, W: Tensor, H: Tensor) -> Tensor:
        """After the column loop, in the original column order: Q the quantized matrix, W the
        weights GPTQ started from, H the damped Hessian it minimized (W-Q)H(W-Q)ᵀ under. A
        quantizer may refit its continuous parameters to that objective (and update its record);
        returns the new Q. The default keeps Q."""
        return Q


def check_ste_clip(clip: object) -> None:
    if clip is not None and not (isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip > 0):
        raise QATError(f"method.ste_clip={clip!r}: must be a positive number or null")


def check_group_size(group_size: int, name: str, in_features: int, gptq_block: int | None) -> None:
    """Columns per scale group must divide the layer's inputs (and PB-GPTQ's block)."""
    if group_size and in_features % group_size:
        raise QATError(f"method.group_size={group_size} does not divide {name}'s in_features={in_features}; "
                       "allowed: 0 (per row) or a divisor of every quantized layer's in_features")
    if group_size and gptq_block and gptq_block % group_size:
        raise QATError(f"method.group_size={group_size} does not divide init.block_size={gptq_block}")


@dataclass
class Method:
    name: ClassVar[str] = "base"
    quantizes: ClassVar[bool] = True  # False: the layer stays an nn.Linear (the fp reference)
    # True: packed_linear quantizes its input itself (e.g. INT4 bit planes); else PackedLinear
    # hands it the fake-quantized activation
    packs_activations: ClassVar[bool] = False
    act_bits: int = 16  # inputs per token asymmetric INT-k (4 or 8; 16: not quantized), any method
    smooth: bool = False  # per-input-channel factors moved from the inputs into the weights (qat.ptq.smooth)
    # strengths searched: SmoothQuant's in [0, 1], and "rc" (ARB-RC's column scales, for binary weights)
    smooth_alphas: tuple[float | str, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

    def validate(self) -> None:
        """Raise QATError on a bad setting."""

    # -- GPTQ hooks (init=gptq_hessian): a method that sets supports_gptq implements both --------
    supports_gptq: ClassVar[bool] = False
    # True: the state does not depend on data (fp16 weights), so every init gives the data-free one
    data_free_only: ClassVar[bool] = False

    def gptq_quantizer(self, weight: Tensor, denominator: Tensor, block_size: int = 128,
                       hdiag: Tensor | None = None) -> ColumnQuantizer:
        """The column quantizer GPTQ runs with. `denominator`: the Hessian saliency's d_j;
        `hdiag`: diag(H), for methods that weight by it."""
        raise NotImplementedError

    def state_from_gptq(self, result: GPTQResult, record: Any) -> dict[str, Tensor]:
        """The QATLinear state whose fake_quant is GPTQ's output (result.quantized) exactly;
        `record`: the quantizer's record()."""
        raise NotImplementedError

    def check_layer(self, name: str, out_features: int, in_features: int, gptq_block: int | None) -> None:
        """Raise QATError if this method cannot quantize a layer of this shape (checked for every
        layer after the model loads, before any work; gptq_block: init=gptq_hessian's block)."""

    def init_state(self, weight: Tensor, hessian: Tensor | None = None) -> dict[str, Tensor]:
        """Buffers for QATLinear; key 'latent' (optional) replaces the trainable weight."""
        raise NotImplementedError

    def fake_quant(self, latent: Tensor, buffers: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def pack(self, latent: Tensor, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def packed_linear(self, x: Tensor, packed: dict[str, Tensor], in_features: int) -> Tensor:
        """`packed`: the stored tensors plus `derived(packed)` (PackedLinear hands both)."""
        raise NotImplementedError

    def cpu_forward(self, packed: dict[str, Tensor], in_features: int) -> Callable[[Tensor], Tensor | None] | None:
        """packed_linear for CPU tensors with the layer's tensors bound once (ops.*_cpu_call), or None:
        at decode sizes the Python between a layer and its C++ kernel costs as much as the kernel.
        The callable returns None where the extension is unavailable (packed_linear runs instead).
        `packed` as for packed_linear, plus the fp32 `input_scale` of a smoothed layer, which the
        callable applies. Default: none."""
        return None

    def derived(self, packed: dict[str, Tensor], in_features: int) -> dict[str, Tensor]:
        """Tensors packed_linear reads that are functions of the stored ones (e.g. a sum of the
        weights, or codes unpacked to bytes): not stored, so not counted in the storage bits.
        PackedLinear computes them once and caches them. Default: none."""
        return {}

    def layer_stats(self, packed: dict[str, Tensor], in_features: int) -> dict[str, Tensor]:
        """Per-grouping figures of a packed layer that results.json summarises (min, mean over the
        model), e.g. dyngroup's groups actually used. Default: none."""
        return {}

    def packed_weight_bits(self, packed: dict[str, Tensor], out_features: int, in_features: int) -> float:
        """`bits.weight` of one packed layer (summed over layers, over their weights): the figure the
        method's paper quotes for this setting, counted from the stored tensors — every value bit
        and every stored scale / zero point, with positions and group ids left out unless the
        paper counts them. Per method: fp16 16; gptq k + scales/zeros; rtn_binary / pbllm_qat
        (1 − r)·1 + r·k + scales (positions left out, PB-LLM); dyngroup 1 + 16·G scales (ids left
        out, WGM's (n + 16G)/n); w11a14 1 + 1 (its group bit counted, as the paper does) + scales.
        `bits.storage` (storage_bits) is everything stored."""
        raise NotImplementedError

    @torch.no_grad()
    def health(self, latent: Tensor, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-layer statistics for the quantization-health log (optional)."""
        return {}

    # -- what the generic code asks a method (instead of reading its fields by name) -----------
    def data_free(self) -> Method:
        """The method as a seed without calibration Hessians runs it (init=rtn, smoothing's
        search, layers the calibration engine does not reach). Default: itself."""
        return self

    def check_act_order(self) -> None:
        """Raise QATError if GPTQ cannot visit this method's columns in descending diag(H)
        order (init.act_order=true), e.g. scale groups of contiguous columns."""

    def frozen_mask(self, buffers: dict[str, Tensor]) -> Tensor | None:
        """Weights training does not move (e.g. PB-LLM's salient ones, stored as codes): the
        health log leaves them out of the sign-flip rate. None: every weight trains."""
        return None

    def trained_state(self) -> tuple[str, ...]:
        """State entries QAT trains beside the latent weight (QATLinear makes them parameters, at
        optim.lr_scale, never decayed), e.g. a learned binary scale. Default: none."""
        return ()

    def refresh_every(self) -> int:
        """QAT steps between calls of `refresh` (0: never)."""
        return 0

    def refresh(self, latent: Tensor, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        """New values for some of the frozen buffers, from the current latent weights (e.g.
        dyngroup's regrouping), copied in place during QAT every `refresh_every` steps."""
        return {}

    def report_fields(self, calibrated: bool) -> dict[str, Any]:
        """What results.json records of the method besides its name: `salient_ratio` (a column
        of the runs' table; None where the method has none) and, for a seed run without
        calibration (`calibrated` false), each setting it ran with instead of the configured one."""
        fields: dict[str, Any] = {"salient_ratio": None}
        if not calibrated:
            fields.update({k: f"{v} (init=rtn: no calibration Hessians)"
                           for k, v in changed_settings(self, self.data_free()).items()})
        return fields


def changed_settings(method: Method, other: Method) -> dict[str, Any]:
    """The settings (dataclass fields) in which `other` differs from `method`, with other's values."""
    return {f.name: getattr(other, f.name) for f in dataclasses.fields(method)
            if getattr(other, f.name) != getattr(method, f.name)}
