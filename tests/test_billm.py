"""BiLLM: residual binarization and the two searches on hand-checked cases, the GPTQ hand-over,
packed == fake quant, the stored bits, QAT, and the pipeline end to end on the tiny model."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from qat.errors import QATError
from qat.methods import build_method
from qat.models.load import tiny_llama
from qat.nn import PackedLinear, QATLinear, bits_report, convert, prepare
from qat.ptq.gptq import gptq
from qat.ptq.initializers import initialize
from qat.quant.billm import (
    break_point_candidates,
    residual_binarize,
    search_break_point,
    search_salient_columns,
)
from qat.quant.binarize import sign_pm1


# -- pure functions ----------------------------------------------------------------------------
def test_residual_binarization_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0], [4.0, 4.0, 8.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    # row 0: mu = 3, r - mu = (-2, -1, 0, 3), alpha = 6/4
    released = residual_binarize(x, mask, 1, torch.sign)          # sign(0) = 0: the entry gets mu
    assert released.approx[0].tolist() == [1.5, 1.5, 3.0, 4.5]
    stored = residual_binarize(x, mask, 1, sign_pm1)              # sign(0) = +1
    assert stored.approx[0].tolist() == [1.5, 1.5, 4.5, 4.5]
    # row 1 over its 3 masked entries: mu = 16/3, alpha = mean(4/3, 4/3, 8/3) = 16/9; outside the mask: 0
    mu, alpha = 16 / 3, 16 / 9
    torch.testing.assert_close(stored.approx[1], torch.tensor([mu - alpha, mu - alpha, mu + alpha, 0.0]))
    torch.testing.assert_close(stored.means[:, 0], torch.tensor([3.0, mu]))
    torch.testing.assert_close(stored.scales[:, 0], torch.tensor([1.5, alpha]))
    # order 2 on row 0: residuals (-0.5, 0.5, -1.5, 1.5): mu2 = 0, alpha2 = 1 -> (0.5, 2.5, 3.5, 5.5)
    second = residual_binarize(x, mask, 2, sign_pm1)
    assert second.approx[0].tolist() == [0.5, 2.5, 3.5, 5.5]
    assert second.positive[1, 0].tolist() == [False, True, False, True]
    # a row with nothing masked: mu = alpha = 0 and no value
    empty = residual_binarize(x, torch.zeros_like(mask), 2)
    assert not empty.approx.any() and not empty.means.any() and not empty.scales.any()
    # stored scales rounded to fp16 before use
    half = residual_binarize(x, mask, 1, sign_pm1, torch.float16)
    assert half.scales[1, 0] == torch.tensor(alpha).half().float()


def two_outlier_block(rows: int = 8) -> torch.Tensor:
    """Columns 0-3: two +1 and two -1 per row (order 1 is exact on them); column 4: 10, column
    5: 20 (a pair per row: order 2 is exact on it)."""
    gen = torch.Generator().manual_seed(0)
    signs = torch.stack([torch.tensor([1.0, 1.0, -1.0, -1.0])[torch.randperm(4, generator=gen)] for _ in range(rows)])
    return torch.cat([signs, torch.full((rows, 1), 10.0), torch.full((rows, 1), 20.0)], dim=1)


def test_salient_column_search_by_hand():
    w = two_outlier_block()
    # candidates (up_lim=3): the top 1 (column 5) or top 2 (columns 5, 4) by column sum of |w|;
    # two salient columns reproduce the block exactly, one does not
    assert search_salient_columns(w, w, up_lim=3).tolist() == [False] * 4 + [True, True]
    # up_lim is at most the block's width, and at least one column is salient
    assert int(search_salient_columns(w[:, :2], w[:, :2], up_lim=50).sum()) == 1


def test_break_point_search_by_hand():
    # per row: a salient column (9), four magnitudes 1 and four 5 (each set balanced in sign)
    ones = torch.tensor([1.0, -1.0, 1.0, -1.0]).expand(8, 4)
    w = torch.cat([torch.full((8, 1), 9.0), ones, 5 * ones], dim=1)
    salient = torch.zeros_like(w, dtype=torch.bool)
    salient[:, 0] = True
    candidates = break_point_candidates(w, salient)
    # numpy's linear quantiles of the 72 magnitudes with the salient entries counted as zeros
    magnitudes = (w * ~salient).abs().flatten().numpy()
    expected = np.quantile(magnitudes, np.linspace(0.1, 0.9, 81, dtype=np.float32))
    np.testing.assert_allclose(candidates.numpy(), expected, rtol=1e-6)
    salient_approx = residual_binarize(w, salient, 2, torch.sign).approx
    # any break in (1, 5] splits exactly; the first such candidate is q = 0.55: 1 + 0.05·4 = 1.2
    assert float(search_break_point(w, salient, salient_approx)) == pytest.approx(1.2, rel=1e-5)


def test_magnitude_seed_on_a_structured_block():
    method = build_method("billm", salient_metric="magnitude", up_lim=3, block_size=6)
    w = two_outlier_block()
    state = method.init_state(w)
    assert state["salient_columns"].tolist() == [False] * 4 + [True, True]
    buffers = {k: v for k, v in state.items() if k != "latent"}
    assert torch.equal(method.fake_quant(state["latent"], buffers), w)  # exact: these values are fp16


# -- GPTQ ---------------------------------------------------------------------------------------
def layer_problem(out_f=48, in_f=320, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=gen) * 0.02
    X = torch.randn(1024, in_f, generator=gen) @ (torch.randn(in_f, in_f, generator=gen) * 0.1 + torch.eye(in_f))
    return W, 2 * X.t() @ X / X.shape[0]


@pytest.mark.parametrize("params", [dict(), dict(scale_dtype="float32"), dict(salient_metric="magnitude"),
                                    dict(search_on="weight"), dict(hessian_denominator="init"),
                                    dict(block_errors="exact")])
def test_gptq_state_fake_quantizes_to_gptq_output_exactly(params):
    W, H = layer_problem()  # 320 columns: two whole blocks and a partial one
    method = build_method("billm", **params)
    quantizer = method.gptq_quantizer(W, torch.diag(H), block_size=128)
    result = gptq(W, H, quantizer, block_size=128)
    state = method.state_from_gptq(result, quantizer)
    q = method.fake_quant(state["latent"], {k: v for k, v in state.items() if k != "latent"})
    assert torch.equal(q, result.quantized)
    # no feedback inside a block: the first block is quantized from the weights as given
    assert torch.equal(result.compensated[:, :128], W[:, :128])
    assert int(state["salient_columns"][:128].sum()) in range(1, 50)


def test_compensation_pays_and_exact_block_errors_pay_more():
    """Magnitude structure: GPTQ differs from the data-free seed only by the compensation of later
    blocks; block_errors=exact spreads the errors GPTQ's column loop would for the same blocks."""
    W, H = layer_problem()
    err = lambda Q: float(torch.trace((Q - W) @ H @ (Q - W).t()))  # noqa: E731
    errors = {}
    for block_errors in ("released", "exact"):
        method = build_method("billm", salient_metric="magnitude", block_errors=block_errors)
        errors[block_errors] = err(gptq(W, H, method.gptq_quantizer(W, torch.diag(H), 128), block_size=128).quantized)
    seed = method.init_state(W)
    errors["rtn"] = err(method.fake_quant(seed["latent"], {k: v for k, v in seed.items() if k != "latent"}))
    assert errors["exact"] < errors["released"] < errors["rtn"]


def test_block_size_and_act_order_are_checked():
    method = build_method("billm")
    with pytest.raises(QATError, match="init.block_size"):
        method.check_layer("l", 8, 256, gptq_block=64)
    W, H = layer_problem(8, 256)
    with pytest.raises(QATError, match="act_order"):
        gptq(W, H, method.gptq_quantizer(W, torch.diag(H), 128), block_size=128, act_order=True)
    with pytest.raises(QATError, match="salient_metric"):
        build_method("billm", salient_metric="hessian").init_state(W)  # no Hessian: use magnitude or GPTQ
    with pytest.raises(QATError, match="up_lim"):
        build_method("billm", up_lim=1)


# -- packed form, bits, training ----------------------------------------------------------------
def tiny_billm(**params):
    method = build_method("billm", salient_metric="magnitude", **params)
    model = tiny_llama({})
    prepare(model, method, initialize(model, method, "rtn", ["lm_head"]).states)
    return model, method


@pytest.mark.parametrize("params", [dict(), dict(block_size=32), dict(scale_dtype="float32", up_lim=8)])
def test_packed_equals_fake_quant(params):
    model, method = tiny_billm(**params)
    fake = {n: m.quantized_weight().detach() for n, m in model.named_modules() if isinstance(m, QATLinear)}
    x = torch.randint(0, 257, (2, 40))
    with torch.no_grad():
        logits = model(x).logits
        convert(model)
        packed_logits = model(x).logits
    for name, m in model.named_modules():
        if isinstance(m, PackedLinear):
            assert torch.equal(method.dequantize(m.packed(), m.in_features), fake[name]), name
    torch.testing.assert_close(packed_logits, logits, rtol=1e-5, atol=1e-5)


def test_the_data_free_seed_of_the_hessian_default_uses_magnitude():
    method = build_method("billm")  # salient_metric=hessian
    model = tiny_llama({})
    states = initialize(model, method, "rtn", ["lm_head"]).states
    expected = build_method("billm", salient_metric="magnitude").init_state(
        model.get_submodule("model.layers.0.mlp.down_proj").weight.detach())
    got = states["model.layers.0.mlp.down_proj"]
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_storage_bits_are_the_stored_tensors():
    """8 x 200: 7 words per row (200 columns), blocks of 128 (one partial), fp16 mu and alpha."""
    method = build_method("billm", salient_metric="magnitude")
    torch.manual_seed(0)
    lin = torch.nn.Linear(200, 8, bias=False)
    model = torch.nn.Sequential(QATLinear(200, 8, method, method.init_state(lin.weight.detach())))
    n_salient = int(model[0].salient_columns.sum())
    convert(model)
    p = model[0]
    words = 7
    signs, large_group, column_bitmap = 8 * words * 32, 8 * words * 32, words * 32
    residual_signs = 8 * ((n_salient + 31) // 32) * 32
    means_and_scales = 2 * 8 * 2 * 4 * 16  # [out, blocks, 4] each
    assert p.storage_bits() == signs + residual_signs + column_bitmap + large_group + means_and_scales
    assert {k: tuple(v.shape) for k, v in p.packed().items()} == {
        "signs": (8, words), "residual_signs": (8, (n_salient + 31) // 32), "salient_columns": (words,),
        "large_group": (8, words), "means": (8, 2, 4), "scales": (8, 2, 4)}
    rep = bits_report(model)
    n = 8 * 200
    assert rep["storage"] == pytest.approx(p.storage_bits() / n)
    assert rep["weight"] == pytest.approx((n + 8 * n_salient) / n)  # the paper's 1·(1 - r) + 2·r


def test_masks_frozen_and_scales_follow_the_latent_weights():
    model, method = tiny_billm(scale_dtype="float32")  # fp16 mu2 can be subnormal: not scale-exact
    q = next(m for m in model.modules() if isinstance(m, QATLinear))
    assert {n for n, _ in q.named_parameters()} == {"weight"}
    before = {k: v.clone() for k, v in q.quant_buffers().items()}
    w = q.quantized_weight().detach()
    with torch.no_grad():
        q.weight.mul_(2.0)  # mu and alpha are recomputed: they scale with the weights
    assert torch.equal(q.quantized_weight().detach(), 2 * w)
    opt = torch.optim.AdamW(q.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        q(torch.randn(4, q.in_features)).pow(2).sum().backward()
        assert q.weight.grad is not None and bool(q.weight.grad.abs().sum() > 0)
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in q.quant_buffers().items())


def test_pipeline_gptq_seed_trains_exports_and_reloads(compose, tmp_path):
    from transformers import AutoModelForCausalLM

    from qat.data import LMDataModule
    from qat.eval import perplexity
    from qat.export import load_export
    from qat.models.tokenizer import ByteTokenizer
    from qat.pipeline import run

    cfg = compose(["model=tiny", "data=tiny", "logger=none", "eval.max_windows=4", "eval.seq_len=64",
                   f"hydra.run.dir={tmp_path}", "method=billm", "init=gptq_hessian", "init.n_samples=4",
                   "init.seq_len=32", "init.cache=false", "trainer.max_steps=2"])
    res = run(cfg, tmp_path)
    assert res["status"] == "ok"
    # rows of 64 and 128 columns: one block each, so 8 fp16 mu / alpha per 64 or 128 weights
    assert 1 < res["bits"]["weight"] < 1.5 < 3 < res["bits"]["storage"] < 5
    model = load_export(tmp_path / "export")
    assert any(isinstance(m, PackedLinear) for m in model.modules())
    data = LMDataModule(dict(cfg.data), ByteTokenizer(), "bytes")
    ppl, _ = perplexity(model, data.test_tokens, 64, 4)
    assert ppl == pytest.approx(res["ppl"]["final"], rel=1e-5)
    through_hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    x = torch.randint(0, 257, (2, 24))
    with torch.no_grad():
        assert torch.equal(through_hf(x).logits, model(x).logits)


# -- the released code (optional: BILLM_REFERENCE=<checkout of Aaronhuang-778/BiLLM>) -------------
@pytest.mark.skipif(not os.environ.get("BILLM_REFERENCE"), reason="BILLM_REFERENCE not set")
@pytest.mark.parametrize("metric", ["hessian", "magnitude"])
def test_matches_the_released_fasterquant(metric):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from billm_reference import import_reference, reference_layer

    ref = import_reference(Path(os.environ["BILLM_REFERENCE"]))
    W, H = layer_problem()
    ours = gptq(W, H, build_method("billm", salient_metric=metric, scale_dtype="float32")
                .gptq_quantizer(W, torch.diag(H), 128), block_size=128).quantized
    assert torch.equal(ours, reference_layer(ref, W, H, metric))
