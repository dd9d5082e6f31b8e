"""Block-wise reconstruction and the choice of what QAT trains, on the tiny model."""
import copy

import pytest
import torch

from qat.errors import QATError
from qat.methods import build_method
from qat.models.load import tiny_llama
from qat.nn import QATLinear, prepare
from qat.ptq.initializers import initialize
from qat.ptq.reconstruct import reconstruct_blocks
from qat.train.lit import select_trainable


def quantized_tiny(seed=0):
    torch.manual_seed(seed)
    fp = tiny_llama({})
    student = copy.deepcopy(fp)
    method = build_method("pbllm_qat", salient_ratio=0.1)
    prepare(student, method, initialize(student, method, "rtn", ["lm_head"]).states)
    return fp, student


@pytest.mark.parametrize("bf16", [False, True])
def test_reconstruction_lowers_every_blocks_error_and_trains_only_latent_weights(bf16):
    fp, student = quantized_tiny()
    calib = torch.randint(0, 257, (6, 32), generator=torch.Generator().manual_seed(1))
    frozen_before = {n: p.detach().clone() for n, p in student.named_parameters() if "layers" in n and "norm" in n}
    buffers_before = {n: b.clone() for n, b in student.named_buffers()}
    latent_before = {n: m.weight.detach().clone() for n, m in student.named_modules() if isinstance(m, QATLinear)}
    report = reconstruct_blocks(student, fp, calib, epochs=3, lr=1e-3, bf16=bf16)
    assert len(report) == 2
    for row in report:
        assert row["rel_error_after"] < row["rel_error_before"]
    for n, p in student.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n  # norms untouched
    for n, b in student.named_buffers():
        assert torch.equal(b, buffers_before[n]), n  # salient codes/masks stay frozen
    assert any(not torch.equal(m.weight, latent_before[n]) for n, m in student.named_modules()
               if isinstance(m, QATLinear))
    assert all(p.requires_grad for p in student.parameters())  # restored for QAT


def test_reconstruction_rejects_bad_settings():
    fp, student = quantized_tiny()
    with pytest.raises(QATError, match="lr=0"):
        reconstruct_blocks(student, fp, torch.zeros(1, 8, dtype=torch.long), epochs=1, lr=0.0)


@pytest.mark.parametrize("which, trains_norms, trains_embedding", [
    ("quantized", False, False), ("quantized+norms", True, False), ("all", True, True)])
def test_select_trainable(which, trains_norms, trains_embedding):
    _, student = quantized_tiny()
    counts = select_trainable(student, which)
    assert counts["quantized"] == sum(m.weight.numel() for m in student.modules() if isinstance(m, QATLinear))
    assert student.model.norm.weight.requires_grad == trains_norms
    assert student.model.embed_tokens.weight.requires_grad == trains_embedding
    assert all(m.weight.requires_grad for m in student.modules() if isinstance(m, QATLinear))
    with pytest.raises(QATError, match="train.params"):
        select_trainable(student, "embeddings")
