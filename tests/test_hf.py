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
    prepare(model, method, initialize(model, method, "rtn", ["lm_head"]).states)
    return convert(model).eval()


@pytest.mark.parametrize("method,params", [("pbllm_qat", dict(salient_ratio=0.1)), ("dyngroup", dict(groups=4)),
                                           ("pbllm_qat", dict(salient_ratio=0.1, salient_bits=4)),
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


@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4"])
def test_quantized_embedding_export_loads_with_the_same_logits(fmt, tmp_path):
    """quantize.embedding: the tied embedding and head in int8 / int4 rows (or fp16), stored once;
    load_export and transformers rebuild the same model as the one evaluated in memory."""
    from transformers import AutoModelForCausalLM

    from qat.export import round_unquantized
    from qat.nn.embedding import QuantEmbedding, QuantHead, convert_embeddings

    model = packed_tiny("pbllm_qat", salient_ratio=0.1)
    record = convert_embeddings(model, fmt)
    round_unquantized(model, fmt)
    save_export(model, tmp_path / "export", "tiny", embedding=record)
    x = torch.randint(0, 257, (2, 24))
    with torch.no_grad():
        want = model(x).logits
        ours = load_export(tmp_path / "export")
        through_hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
        assert torch.equal(ours(x).logits, want) and torch.equal(through_hf(x).logits, want)
    for m in (ours, through_hf):
        if fmt == "fp16":
            assert m.get_input_embeddings().weight.dtype == torch.float32
            assert m.get_input_embeddings().weight is m.get_output_embeddings().weight
        else:
            assert isinstance(m.get_input_embeddings(), QuantEmbedding)
            assert isinstance(m.lm_head, QuantHead) and m.lm_head.tied_to is m.get_input_embeddings()


@pytest.mark.parametrize("kernels", ["default", "reference"])
def test_the_readme_loading_snippet_runs_in_a_fresh_process(kernels, tmp_path):
    """The README's snippet, verbatim but for the path, in a process that imports nothing else first:
    load with transformers after `import qat`, then generate. (A module-level tensor created while
    transformers builds the model on the meta device crashed the first forward.)"""
    import re
    from pathlib import Path

    from qat.nn.embedding import convert_embeddings

    model = packed_tiny("pbllm_qat", salient_ratio=0.1)
    save_export(model, tmp_path / "export", "tiny", embedding=convert_embeddings(model, "int8"))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = re.search(r"```python\n(import qat  # registers.*?)```", readme, re.S).group(1)
    assert "from_pretrained" in snippet
    code = snippet.replace("outputs/.../export", str(tmp_path / "export"))
    code = "\n".join(line for line in code.splitlines() if "AutoTokenizer.from_pretrained" not in line)  # tiny: no tokenizer
    code += ("\nimport torch\nout = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)\n"
             "assert out.shape == (1, 8), out.shape\nprint('generated', out.tolist())\n")
    import os

    env = dict(os.environ, **({"QAT_KERNELS": "reference"} if kernels == "reference" else {}))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "generated" in res.stdout


def test_no_module_of_qat_holds_a_tensor_made_at_import():
    """A tensor made at import lives on whatever device context the import happened under
    (transformers builds models under a meta-device context): the README snippet's crash."""
    import importlib
    import pkgutil

    names = [info.name for info in pkgutil.walk_packages(qat.__path__, "qat.")]
    for name in names:
        module = importlib.import_module(name)
        tensors = [k for k, v in vars(module).items() if isinstance(v, torch.Tensor)]
        assert not tensors, f"{name} holds module-level tensors {tensors}"
    # and every module imports under a meta-device context, as transformers' from_pretrained runs it
    code = "import importlib, torch\nwith torch.device('meta'):\n" + "".join(
        f"    importlib.import_module({n!r})\n" for n in names)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
