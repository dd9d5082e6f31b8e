"""docs/adding-a-method.md followed as written: a new method in one python file and one yaml,
outside the package, through the whole pipeline (seed -> QAT -> packed -> export -> reload)."""
import importlib
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# the one python file (the doc's example, verbatim)
TOY_METHOD = '''
"""toy_ternary: w ≈ alpha·t, t in {-1, 0, +1} per weight, one alpha per row (TWN's rule)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from qat.errors import QATError
from qat.methods import Method, register
from qat.quant.bits import tensor_bits
from qat.quant.packing import pack_bits, unpack_bits


def ternarize(w: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """(positive, nonzero, alpha fp16 [out]): |w| above threshold·mean|w| of its row is nonzero;
    alpha = the mean |w| of the row's nonzero entries, rounded to fp16 as the packed form stores it."""
    mag = w.abs()
    nonzero = mag > threshold * mag.mean(dim=1, keepdim=True)
    alpha = (mag * nonzero).sum(dim=1) / nonzero.sum(dim=1).clamp_min(1)
    return w >= 0, nonzero, alpha.to(torch.float16)


def ternary_weight(positive: Tensor, nonzero: Tensor, alpha: Tensor) -> Tensor:
    a = alpha.float()[:, None]
    return torch.where(nonzero, torch.where(positive, a, -a), 0.0)


@register
@dataclass
class Ternary(Method):
    name: ClassVar[str] = "toy_ternary"
    threshold: float = 0.7  # a weight is 0 below threshold·mean|w| of its row

    def validate(self) -> None:
        if not 0 <= self.threshold < 1:
            raise QATError(f"method.threshold={self.threshold!r}: must be in [0, 1)")

    def init_state(self, weight: Tensor, hessian: Tensor | None = None) -> dict[str, Tensor]:
        return {"latent": weight.detach().clone()}  # no frozen buffers: all comes from the latent

    def fake_quant(self, latent: Tensor, buffers: dict[str, Tensor]) -> Tensor:
        q = ternary_weight(*ternarize(latent.detach(), self.threshold))
        return q + (latent - latent.detach())  # forward: q exactly; backward: straight through

    @torch.no_grad()
    def pack(self, latent: Tensor, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        positive, nonzero, alpha = ternarize(latent.float(), self.threshold)
        return {"signs": pack_bits(positive), "nonzero": pack_bits(nonzero), "scales": alpha}

    def packed_linear(self, x: Tensor, packed: dict[str, Tensor], in_features: int) -> Tensor:
        w = ternary_weight(unpack_bits(packed["signs"], in_features), unpack_bits(packed["nonzero"], in_features),
                           packed["scales"])
        return F.linear(x, w.to(x.dtype))

    def packed_weight_bits(self, packed: dict[str, Tensor], out_features: int, in_features: int) -> float:
        return 2 * out_features * in_features + tensor_bits([packed["scales"]])  # two bit planes + alphas
'''

# the one yaml (hydra finds it under <folder>/method/ with hydra.searchpath=[file://<folder>])
TOY_YAML = """\
name: toy_ternary
threshold: 0.7
"""

TINY = ["model=tiny", "data=tiny", "logger=none", "eval.max_windows=4", "eval.seq_len=64"]


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy method imported from its own file (so it registers) and its yaml's folder; the
    registry and sys.modules are restored afterwards."""
    import qat.methods

    monkeypatch.setattr(qat.methods, "REGISTRY", dict(qat.methods.REGISTRY))
    code = tmp_path / "code"
    code.mkdir()
    (code / "toy_ternary.py").write_text(TOY_METHOD)
    conf = tmp_path / "conf"
    (conf / "method").mkdir(parents=True)
    (conf / "method" / "toy_ternary.yaml").write_text(TOY_YAML)
    monkeypatch.syspath_prepend(str(code))
    importlib.invalidate_caches()
    try:
        yield importlib.import_module("toy_ternary"), conf
    finally:
        sys.modules.pop("toy_ternary", None)


def test_the_toy_method_registers_and_its_packed_form_is_its_fake_quant(toy):
    from qat.errors import QATError
    from qat.methods import build_method
    from qat.models.load import tiny_llama
    from qat.nn import PackedLinear, bits_report, convert, prepare
    from qat.ptq.initializers import initialize

    module, _ = toy
    method = build_method("toy_ternary", threshold=0.5)
    assert isinstance(method, module.Ternary)
    with pytest.raises(QATError, match="method.threshold=1.5"):
        build_method("toy_ternary", threshold=1.5)
    with pytest.raises(QATError, match="init=gptq_hessian is not available for method='toy_ternary'"):
        initialize(tiny_llama({}), method, "gptq_hessian", ["lm_head"], torch.randint(0, 257, (2, 32)))

    model = tiny_llama({})
    prepare(model, method, initialize(model, method, "rtn", ["lm_head"]).states)
    x = torch.randint(0, 257, (2, 40))
    with torch.no_grad():
        fake = model(x).logits
        convert(model)
        packed = model(x).logits
    assert torch.equal(packed, fake)  # the same floats, multiplied the same way
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 14
    first = layers[0]
    W = first.method.packed_linear(torch.eye(first.in_features), first.packed(), first.in_features).t()
    alpha = first.scales.float()[:, None]
    assert bool(((W == 0) | (W.abs() == alpha)).all()) and bool((W == 0).any())  # {-alpha, 0, +alpha} per row
    n = sum(m.in_features * m.out_features for m in layers)
    stored = sum(t.numel() * t.element_size() * 8 for m in layers for t in m.packed().values())
    bits = bits_report(model)
    assert bits["storage"] == stored / n
    assert bits["weight"] == sum(2 * m.in_features * m.out_features + 16 * m.out_features for m in layers) / n


def test_the_toy_method_runs_the_pipeline_and_its_export_reloads(toy, compose, tmp_path):
    from qat.data import LMDataModule
    from qat.eval import perplexity
    from qat.export import load_export
    from qat.models.tokenizer import ByteTokenizer
    from qat.nn import PackedLinear
    from qat.pipeline import run

    _, conf = toy
    run_dir = tmp_path / "run"
    cfg = compose(TINY + [f"hydra.run.dir={run_dir}", f"hydra.searchpath=[file://{conf}]", "method=toy_ternary",
                          "method.threshold=0.6", "init=rtn", "trainer.max_steps=3", "trainer.val_check_interval=3"])
    res = run(cfg, run_dir)
    assert res["status"] == "ok" and res["method"] == "toy_ternary" and res["train_tokens"] == 3 * 2 * 64
    assert res["ppl"]["final"] != res["ppl"]["init"]  # QAT moved the latent weights (straight through)
    assert res["ppl"]["final"] < 2 * res["ppl"]["fp"]  # a real (tiny, random) model, not garbage

    model = load_export(run_dir / "export")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert len(layers) == 14 and all(m.method.threshold == 0.6 for m in layers.values())
    data = LMDataModule(dict(cfg.data), ByteTokenizer(), "bytes")
    ppl, _ = perplexity(model, data.test_tokens, 64, 4)
    assert ppl == res["ppl"]["final"]  # the same stored values through the same packed forward
    # bits.storage is counted from the tensors the export stores for these layers
    tensors = load_file(Path(run_dir / "export" / "model.safetensors"))
    stored = sum(t.numel() * t.element_size() * 8 for k, t in tensors.items()
                 if k.rpartition(".")[0] in layers and k.rpartition(".")[2] in ("signs", "nonzero", "scales"))
    n = sum(m.in_features * m.out_features for m in layers.values())
    assert res["bits"]["storage"] == pytest.approx(stored / n, rel=1e-12)
    assert 2 < res["bits"]["storage"] < 2.5
