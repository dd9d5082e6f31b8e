"""Exports in plain transformers: loaded through the registered quantizer after `import qat`,
refused loudly without it, with the tokenizer alongside."""
import subprocess
import sys

import pytest
import torch

import qat  # noqa: F401  (registers quant_method "qat" with transformers)
from qat.export import load_export, save_export
from qat.methods import build_method
from qat.models.load import tiny_llama
from qat.nn import PackedLinear, convert, prepare
from qat.ptq.initializers import initialize


def packed_tiny(method_name: str, **params) -> torch.nn.Module:
    model = tiny_llama({})
    method = build_method(method_name, **params)
    prepare(model, method, initialize(model, method, "rtn", ["lm_head"]))
    return convert(model).eval()


@pytest.mark.parametrize("method,params", [("pbllm_qat", dict(salient_ratio=0.1)), ("dyngroup", dict(groups=4)),
                                           ("gptq", dict(bits=4)), ("w11a14", dict())])
def test_transformers_loads_the_packed_model_with_the_same_logits(method, params, tmp_path):
    from transformers import AutoModelForCausalLM

    save_export(packed_tiny(method, **params), tmp_path / "export", "tiny")
    through_hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    ours = load_export(tmp_path / "export")
    assert isinstance(through_hf.get_submodule("model.layers.0.mlp.down_proj"), PackedLinear)
    x = torch.randint(0, 257, (2, 24))
    with torch.no_grad():
        assert torch.equal(through_hf(x).logits, ours(x).logits)


def test_without_qat_transformers_refuses_the_export_loudly(tmp_path):
    save_export(packed_tiny("pbllm_qat", salient_ratio=0.1), tmp_path / "export", "tiny")
    code = ("from transformers import AutoModelForCausalLM; "
            f"AutoModelForCausalLM.from_pretrained({str(tmp_path / 'export')!r})")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode != 0  # never a model with random weights in the quantized layers
    assert "mismatch" in res.stderr.lower()


def test_the_export_holds_the_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "binary": 1, "weights": 2}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    save_export(packed_tiny("rtn_binary"), tmp_path / "export", "tiny", tokenizer)
    again = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert again("binary weights")["input_ids"] == tokenizer("binary weights")["input_ids"] == [1, 2]
