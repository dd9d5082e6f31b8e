"""PTQ initializers: the state each quantized layer starts QAT from (or is evaluated in, as
pure PTQ when trainer.max_steps=0).

  rtn           data-free: the method's init_state on the fp weights
  gptq_hessian  calibration + GPTQ (methods.md §4): for pbllm_qat this is PB-GPTQ, for gptq
                plain GPTQ. Cached per (weights' fingerprint, method, init settings, calibration set).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qat.errors import QATError, check_choice
from qat.fetch import cache_dir
from qat.io import atomic_write_bytes
from qat.methods.base import Method, changed_settings
from qat.nn.qat_linear import quantizable_linears
from qat.ptq.calibrate import sequential_quantize
from qat.ptq.gptq import SALIENCY_KINDS, gptq, inverse_hessian_factor, prepare_hessian, saliency_denominator
from qat.quant.activations import ACT_CLIP_START, fake_quant_act

log = logging.getLogger(__name__)
INITIALIZERS = ["rtn", "gptq_hessian"]
# bump when the PTQ algorithms change what they produce, so stale cached states are not reused
PTQ_CACHE_VERSION = 6  # 5: W(1+1)'s EM starts at the magnitude quartiles; 6: dyngroup's lambda is scale-free


def weights_fingerprint(model: nn.Module, samples: int = 4096) -> str:
    """A cheap content hash of a model's weights: every tensor's name, shape, dtype and ~4k
    evenly strided values. Two checkpoints that share a name but not their weights differ."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat[::step][:samples].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _cache_key(model: nn.Module, method: Method, init_cfg: dict, skip: list[str], calib: Tensor) -> str:
    calib_hash = hashlib.sha1(calib.numpy().tobytes()).hexdigest()
    blob = json.dumps([PTQ_CACHE_VERSION, weights_fingerprint(model), method.name, dataclasses.asdict(method),
                       init_cfg, skip, calib_hash], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def gptq_hessian_states(model: nn.Module, method: Method, init_cfg: dict, skip: list[str],
                        calib: Tensor) -> tuple[dict, list[dict]]:
    if not method.supports_gptq:
        raise QATError(f"init=gptq_hessian is not available for method={method.name!r}")
    block, percdamp = int(init_cfg.get("block_size", 128)), float(init_cfg.get("percdamp", 0.01))
    act_order = bool(init_cfg.get("act_order", False))
    if act_order:
        method.check_act_order()

    saliency = init_cfg.get("saliency", "hinv_sq")
    check_choice("init.saliency", saliency, SALIENCY_KINDS)

    fallbacks: list[str] = []
    data_free = method.data_free()

    def quantize(name: str, lin: nn.Linear, H: Tensor) -> dict[str, Tensor]:
        W, Hp = prepare_hessian(lin.weight.detach(), H)
        try:
            U, _, _ = inverse_hessian_factor(Hp, percdamp)
            quantizer = method.gptq_quantizer(W, saliency_denominator(U, saliency), block, hdiag=torch.diag(Hp))
            result = gptq(W, H, quantizer, block_size=block, percdamp=percdamp, act_order=act_order)
        except torch.linalg.LinAlgError:
            # numerically indefinite even after the damping retries: this layer gets the
            # data-free seed instead of killing the run (recorded in calibration_errors.json)
            log.warning("%s: Hessian not positive definite after damping retries; layer falls back to init=rtn", name)
            fallbacks.append(name)
            return data_free.init_state(lin.weight.detach().float())
        if result.retries:
            log.warning("%s: Cholesky needed percdamp=%g", name, result.damp)
        return method.state_from_gptq(result, quantizer.record())

    def fake_quant(state: dict[str, Tensor]) -> Tensor:
        buffers = {k: v for k, v in state.items() if k != "latent"}
        return method.fake_quant(state["latent"], buffers)

    # a method that quantizes its inputs sees them quantized here too: the Hessians are those of
    # the INT-k activations, and later layers run on them (the clip at its QAT starting value)
    hooks = []
    if method.act_bits < 16:
        hooks = [lin.register_forward_pre_hook(
                 lambda _m, args: (fake_quant_act(args[0], method.act_bits, ACT_CLIP_START), *args[1:]))
                 for _, lin in quantizable_linears(model, skip)]
    try:
        states, errors = sequential_quantize(model, calib, skip, quantize, fake_quant,
                                             true_sequential=bool(init_cfg.get("true_sequential", True)))
    finally:
        for h in hooks:
            h.remove()
    for row in errors:
        if row["layer"] in fallbacks:
            row["fallback"] = "rtn"
    return states, errors


@dataclass
class InitResult:
    """What `initialize` returns: per quantized layer name, the state QATLinear is built from,
    and, when this call ran the calibration engine (not from the cache, not rtn), one row per
    layer with its relative output error (and `"fallback": "rtn"` where the Hessian stayed
    indefinite and the layer got the data-free seed)."""
    states: dict[str, dict[str, Tensor]]
    errors: list[dict] | None = None

    def calibration_counts(self) -> dict[str, int] | None:
        """results.json's `calibration`: layers through GPTQ, and how many fell back to rtn."""
        if not self.errors:
            return None
        return {"layers": len(self.errors), "rtn_fallback": sum(1 for e in self.errors if e.get("fallback"))}


@torch.no_grad()
def initialize(model: nn.Module, method: Method, init: str, skip: list[str],
               calibration: Tensor | None = None, init_cfg: dict | None = None,
               model_name: str = "model", use_cache: bool = False) -> InitResult:
    """The PTQ seed of every quantized layer (and, for a calibrated one, its errors)."""
    check_choice("init", init, INITIALIZERS)
    if not method.quantizes:
        return InitResult({})
    init_cfg = init_cfg or {}
    if method.data_free_only:
        init = "rtn"
    layers = quantizable_linears(model, skip)
    states: dict[str, dict[str, Tensor]] = {}
    errors = None
    if init == "gptq_hessian":
        if calibration is None:
            raise QATError("init=gptq_hessian needs calibration samples")
        key = _cache_key(model, method, init_cfg, skip, calibration)
        path = cache_dir() / "ptq" / f"{Path(model_name).name}-{key}.pt"  # the name only for people
        if use_cache and path.exists():
            log.info("PTQ state from cache %s", path)
            try:
                return InitResult(torch.load(path, map_location=next(model.parameters()).device))
            except Exception:
                raise QATError(f"cached PTQ state {path} is corrupt; delete it to recalibrate") from None
        states, errors = gptq_hessian_states(model, method, init_cfg, skip, calibration)
        worst = sorted(errors, key=lambda e: -e["rel_output_error"])[:5]
        log.info("GPTQ relative output error, worst layers: %s",
                 ", ".join(f"{e['layer']}={e['rel_output_error']:.3f}" for e in worst))
    # layers the engine did not cover (not in a decoder layer) and the rtn seed
    rest = [(n, m) for n, m in layers if n not in states]
    data_free = method.data_free()
    if rest and data_free != method:  # no Hessians for these: e.g. salient weights ranked by |w|
        log.warning("%d layers without calibration Hessians (init=%s): seeded with %s", len(rest), init,
                    ", ".join(f"method.{k}={v}" for k, v in changed_settings(method, data_free).items()))
    for name, lin in tqdm(rest, desc=f"init={init}", leave=False):
        states[name] = data_free.init_state(lin.weight.detach().float())
    if init == "gptq_hessian" and use_cache:
        buf = io.BytesIO()
        torch.save(states, buf)
        try:
            atomic_write_bytes(path, buf.getvalue())
        except OSError as e:  # a cache is an optimisation: a full or read-only disk must not end the run
            log.warning("PTQ cache not written (%s: %s); the run goes on without it", path.parent,
                        e.strerror or type(e).__name__)
    return InitResult(states, errors)
