"""Smoothing (methods.md §6, SmoothQuant-style): per-input-channel factors s moved from a linear's
inputs into its weights, y = (x / s)·(W·s)ᵀ, so that outlier channels no longer stretch every
token's INT-k grid. The fp output is unchanged; only the quantized one differs.

For each group of linears that read the same input, s_j = max|x_j|^a / max|W_:j|^(1-a), with the
migration strength a searched on calibration tokens: the candidate with the lowest measured output
error of the *quantized* layers (the method's data-free weights, its INT-k inputs) wins, and
"no smoothing" is always a candidate. Where a norm feeds the group (Llama: input_layernorm ->
q/k/v, post_attention_layernorm -> gate/up) 1/s is folded into the norm's weight (and bias); else
(o_proj, down_proj) the linear keeps s as an explicit per-channel `input_scale` (fp16, counted in
its storage bits). A linear in `quantize.skip` that reads a smoothed norm's output is left out of
the search but still gets W·s, since it reads x/s too (it stays fp, so this is exact). The loop is
the calibration engine's: one decoder layer at a time.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qat.methods.base import Method
from qat.models.arch import ReaderGroup, architecture, decoder_layers
from qat.ptq.calibrate import capture_layer0_inputs, feed_inputs
from qat.quant.activations import ACT_CLIP_START, fake_quant_act

log = logging.getLogger(__name__)


def layer_groups(spec: tuple[ReaderGroup, ...], layer_prefix: str,
                 skip: list[str]) -> list[tuple[str | None, list[str], list[str]]]:
    """(norm, the linears searched on: the quantized ones, every linear that reads the group's
    input) per group of one decoder layer, leaving out groups with no quantized linear. A linear is
    skipped when a `skip` entry is part of its full name."""
    out = []
    for group in spec:
        norm, readers = group.norm, list(group.linears)
        # without a norm, s becomes one linear's explicit input_scale: such a group is that linear alone
        assert norm is not None or len(readers) == 1, readers
        quantized = [n for n in readers if not any(s in f"{layer_prefix}.{n}" for s in skip)]
        if quantized:
            out.append((norm, quantized, readers))
    return out


def smoothing_factors(act_absmax: Tensor, weight_absmax: Tensor, strength: float) -> Tensor:
    """s_j = max|x_j|^a / max|W_:j|^(1-a), rounded to fp16 (what the packed layer stores)."""
    s = act_absmax.clamp_min(1e-5).pow(strength) / weight_absmax.clamp_min(1e-5).pow(1 - strength)
    return s.clamp(1e-4, 1e4).half().float()


def binary_column_factors(weights: list[Tensor], iters: int = 15) -> Tensor:
    """ARB-RC's column scales as smoothing factors: W ≈ diag(a)·sign(W)·diag(c) by alternating least
    squares over the stacked rows of the linears that read one input (W∘sign(W) = |W|), c scaled to
    mean 1; s = 1/c, so that W·s is as close to one scale per row times signs as this form allows.
    The candidate `rc` of method.smooth_alphas (for binary methods)."""
    mag = torch.cat([w.float() for w in weights]).abs()
    c = torch.ones(mag.shape[1], dtype=mag.dtype, device=mag.device)
    for _ in range(iters):
        a = (mag * c).sum(dim=1) / (c * c).sum()
        c = (mag * a[:, None]).sum(dim=0) / (a * a).sum().clamp_min(1e-30)
        c = c / c.mean().clamp_min(1e-30)
    return (1.0 / c.clamp_min(1e-4)).clamp(1e-4, 1e4).half().float()


def quantized_output_error(x: Tensor, weights: list[Tensor], s: Tensor | None,
                           quantize_weight: Callable[[Tensor], Tensor], act_bits: int) -> float:
    """Σ ||x Wᵀ − Q(x/s) Q(W·s)ᵀ||² / Σ ||x Wᵀ||² over the linears that read x (s None: no smoothing)."""
    xs = x if s is None else x / s
    if act_bits < 16:
        xs = fake_quant_act(xs, act_bits, ACT_CLIP_START)
    num = den = 0.0
    for w in weights:
        ref = x @ w.t()
        out = xs @ quantize_weight(w if s is None else w * s).t()
        num += float((out - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    return num / max(den, 1e-12)


def best_smoothing(x: Tensor, act_absmax: Tensor, weights: list[Tensor], strengths: list[float | str],
                   quantize_weight: Callable[[Tensor], Tensor],
                   act_bits: int) -> tuple[float | None, Tensor | None, dict]:
    """(strength, s) with the lowest quantized output error; (None, None) when not smoothing wins.
    A strength is SmoothQuant's migration strength in [0, 1], or "rc" (binary_column_factors)."""
    weight_absmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
    errors = {"none": quantized_output_error(x, weights, None, quantize_weight, act_bits)}
    best, best_s, best_err = None, None, errors["none"]
    for a in strengths:
        s = binary_column_factors(weights) if a == "rc" else smoothing_factors(act_absmax, weight_absmax, a)
        errors[a if a == "rc" else f"{a:g}"] = err = quantized_output_error(x, weights, s, quantize_weight, act_bits)
        if err < best_err:
            best, best_s, best_err = a, s, err
    return best, best_s, errors


class _InputStats:
    """Per-channel max |x| over every token, and up to `keep` of the tokens (strided) for the search."""

    def __init__(self, keep_per_sample: int):
        self.absmax: Tensor | None = None
        self.rows: list[Tensor] = []
        self.keep = keep_per_sample

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        m = x.abs().amax(dim=0)
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        self.rows.append(x[:: max(1, x.shape[0] // self.keep)][: self.keep])


@torch.no_grad()
def smooth_model(model: nn.Module, calib: Tensor, method: Method, skip: list[str],
                 max_tokens: int = 2048) -> tuple[dict[str, Tensor], list[dict]]:
    """Smooth `model` in place (method.smooth_alphas searched per group). Returns the explicit
    input scales by linear name (hooked on those nn.Linears so the model stays fp-equivalent until
    QATLinear takes them over) and one row per group: the chosen strength and the errors tried."""
    arch = architecture(model, "method.smooth=true")

    seed_method = method.data_free()  # the seed the search can run without data

    def quantize_weight(w: Tensor) -> Tensor:
        state = seed_method.init_state(w)
        return seed_method.fake_quant(state.pop("latent", w), state).float()

    prefix, layers = decoder_layers(model)
    inputs, kwargs = capture_layer0_inputs(model, layers, calib)
    keep = max(1, max_tokens // max(1, len(inputs)))
    explicit: dict[str, Tensor] = {}
    rows: list[dict] = []
    for li, layer in enumerate(tqdm(layers, desc="smooth layers", leave=False)):
        groups = layer_groups(arch.groups, f"{prefix}.{li}", skip)
        stats = {names[0]: _InputStats(keep) for _, names, _ in groups}
        # smoothing leaves the layer's function as it is: its outputs now are the next layer's inputs
        outputs = feed_inputs(layer, {layer.get_submodule(n): st for n, st in stats.items()}, inputs, kwargs)
        for norm_name, names, readers in groups:
            st = stats[names[0]]
            linears = [layer.get_submodule(n) for n in names]
            a, s, errors = best_smoothing(torch.cat(st.rows), st.absmax, [lin.weight.float() for lin in linears],
                                          list(method.smooth_alphas), quantize_weight, method.act_bits)
            rows.append({"layer": f"{prefix}.{li}", "linears": names, "strength": a, "errors": errors})
            if s is None:
                continue
            for reader in readers:  # skipped readers too: all of them see x/s
                lin = layer.get_submodule(reader)
                lin.weight.mul_(s.to(lin.weight.dtype))
            if norm_name is not None:
                norm = layer.get_submodule(norm_name)
                norm.weight.div_(s.to(norm.weight.dtype))
                if getattr(norm, "bias", None) is not None:
                    norm.bias.div_(s.to(norm.bias.dtype))
            else:
                name = f"{prefix}.{li}.{names[0]}"
                explicit[name] = s
                linears[0].register_forward_pre_hook(lambda _m, args, s=s: (args[0] / s.to(args[0].dtype), *args[1:]))
        inputs = outputs
    chosen = [r["strength"] for r in rows]
    log.info("smoothing: %d of %d groups smoothed; strengths %s", sum(a is not None for a in chosen), len(chosen),
             sorted({a for a in chosen if a is not None}, key=str))
    return explicit, rows
