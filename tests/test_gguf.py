"""GGUF export: ggml's block layouts (against gguf's own dequantizer), one clear error for what
ggml cannot hold, and the file run by the real llama.cpp (llama-cpp-python, installed by
`make setup`) against the transformers / packed model it came from."""
import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from qat.errors import QATError
from qat.eval import llama_cpp
from qat.export import ggml_blocks as blocks
from qat.export import load_export, save_export
from qat.export.gguf import rotary_row_order, write_gguf
from qat.methods import build_method
from qat.models.load import tiny_llama
from qat.models.tokenizer import hf_byte_tokenizer
from qat.nn import PackedLinear, convert, prepare
from qat.nn.embedding import QuantHead, convert_embeddings, snap_embeddings
from qat.ptq.initializers import initialize

TEXT = list(b"The quick brown fox jumps over the lazy dog; a binary model runs in llama.cpp. ")


def dequantized(data: np.ndarray, qtype: str) -> np.ndarray:
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])


def test_q4_0_q4_1_q8_0_blocks_are_the_values_gguf_dequantizes():
    g = np.random.default_rng(0)
    rows, n = 3, 96
    d = g.uniform(0.01, 2, (rows, n // 32)).astype(np.float16)
    m = g.uniform(-2, 2, (rows, n // 32)).astype(np.float16)
    dd, mm = np.repeat(d, 32, 1).astype(np.float32), np.repeat(m, 32, 1).astype(np.float32)
    nib = g.integers(0, 16, (rows, n))
    i8 = g.integers(-127, 128, (rows, n))
    np.testing.assert_array_equal(dequantized(blocks.q4_0(nib, d), "Q4_0"), (nib - 8) * dd)
    np.testing.assert_array_equal(dequantized(blocks.q4_1(nib, d, m), "Q4_1"), nib * dd + mm)
    np.testing.assert_array_equal(dequantized(blocks.q8_0(i8, d), "Q8_0"), i8 * dd)


def test_q1_0_block_layout_by_hand():
    # weight j of a block: bit j % 8 of byte j // 8, least significant first; fp16 d first
    bits = np.zeros((1, 256), dtype=bool)
    bits[0, [0, 9, 127, 128 + 7]] = True
    d = np.array([[0.5, -2.0]], dtype=np.float16)
    data = blocks.q1_0(bits, d)
    assert data.shape == (1, 2 * 18)
    qs0 = [1, 2] + [0] * 13 + [0x80]
    qs1 = [0x80] + [0] * 15
    assert data[0].tolist() == [0x00, 0x38] + qs0 + [0x00, 0xC0] + qs1  # fp16 0.5 = 0x3800, -2 = 0xC000
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q1_0] == (128, 18)


def test_block_scales_repeat_a_group_per_block_and_refuse_straddling():
    s = np.arange(6, dtype=np.float16).reshape(2, 3)  # groups of 128 over 384 columns
    np.testing.assert_array_equal(blocks.block_scales(s, 384, 128), s)
    np.testing.assert_array_equal(blocks.block_scales(s, 384, 32), np.repeat(s, 4, 1))
    assert blocks.block_scales(s[:, :1], 576, 128) is None  # rows of 576 are not whole 128-blocks
    assert blocks.block_scales(np.ones((1, 4), np.float16), 256, 128) is None  # groups of 64 < a block
    np.testing.assert_array_equal(blocks.block_scales(s[:, :1], 576, 32), np.repeat(s[:, :1], 18, 1))


def test_rotary_row_order_interleaves_each_heads_two_halves():
    # per head, HF keeps the rotary pairs as (first half, second half); llama.cpp as (i, i + half)
    assert rotary_row_order(8, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


# -- tiny models -----------------------------------------------------------------------------------
WIDE = dict(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2)


def packed_tiny(method: str, params: dict, embedding: str, dims: dict, tmp_path):
    model = tiny_llama(dims)
    m = build_method(method, **params)
    snap_embeddings(model, embedding)
    prepare(model, m, initialize(model, m, "rtn", ["lm_head"]).states)
    model = convert(model).eval()
    save_export(model, tmp_path / "export", "tiny", hf_byte_tokenizer(), embedding=convert_embeddings(model, embedding))
    return load_export(tmp_path / "export")


def q8_0_activations(model: torch.nn.Module) -> None:
    """Round every quantized layer's input as llama.cpp does for its Q8_0 dot products (blocks of
    32, d = max|x| / 127 stored in fp16): the size of the error llama.cpp's activations add."""
    def hook(_, args):
        x = args[0]
        xb = x.reshape(*x.shape[:-1], -1, 32)
        d = xb.abs().amax(-1, keepdim=True) / 127
        q = torch.round(xb / torch.where(d > 0, d, torch.ones_like(d)))
        return ((q * d.half().float()).reshape(x.shape),)

    for mod in model.modules():
        if isinstance(mod, (PackedLinear, QuantHead)):
            mod.register_forward_pre_hook(hook)


def test_llama_cpp_computes_the_fp_model_exactly(tmp_path):
    """Names, Q/K row order, norms, rotary, tokenizer: written in F32 with an F32 cache, llama.cpp's
    logits are transformers' to float rounding."""
    model = tiny_llama(WIDE).eval()
    save_export(model, tmp_path / "export", "tiny", hf_byte_tokenizer())
    report = write_gguf(tmp_path, tmp_path / "fp.gguf", float_type="f32")
    assert {t["type"] for t in report["tensors"]} == {"F32"}
    with torch.no_grad():
        ref = model(torch.tensor([TEXT])).logits[0].numpy()
    with llama_cpp.llama(tmp_path / "fp.gguf", n_ctx=128, f32_cache=True) as llm:
        got = llama_cpp.logits(llm, TEXT)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("method,params,embedding,dims,types", [
    ("rtn_binary", {}, "int8", WIDE, {"Q1_0", "Q8_0", "F32"}),
    ("pbllm_qat", dict(salient_ratio=0.0, group_size=128), "int4", WIDE, {"Q1_0", "Q4_0", "F32"}),
    ("rtn_binary", {}, "fp16", dict(WIDE, hidden_size=192, intermediate_size=320, num_heads=3, num_kv_heads=1),
     {"Q4_0", "F16", "F32"}),  # rows of 192: ±d as Q4_0
    ("gptq", dict(bits=4, group_size=32), "int8", WIDE, {"Q4_1", "Q8_0", "F32"}),
    ("rtn_binary", {}, "int8", dict(WIDE, tied=False), {"Q1_0", "Q8_0", "F32"}),  # output.weight: its own Q8_0
    ("rtn_binary", {}, "fp16", dict(WIDE, tied=False), {"Q1_0", "F16", "F32"}),
])
def test_llama_cpp_runs_the_packed_model(method, params, embedding, dims, types, tmp_path):
    ours = packed_tiny(method, params, embedding, dims, tmp_path)
    report = write_gguf(tmp_path / "export", tmp_path / "m.gguf")
    assert {t["type"] for t in report["tensors"]} == types
    assert ("output.weight" in {t["name"] for t in report["tensors"]}) == (dims.get("tied") is False)
    exact = [t for t in report["tensors"] if t["type"] in ("Q1_0", "Q4_0", "Q8_0", "F16", "F32")]
    assert all(t["max_abs_change"] == 0 for t in exact)
    assert report["bytes"] == (tmp_path / "m.gguf").stat().st_size
    assert report["bits_per_weight"] == pytest.approx(report["bytes"] * 8 / report["parameters"])

    x = torch.tensor([TEXT])
    with torch.no_grad():
        ref = ours(x).logits[0].numpy()
        q8_0_activations(ours)
        emulated = ours(x).logits[0].numpy()
    activation_error = np.abs(emulated - ref).max()
    with llama_cpp.llama(tmp_path / "m.gguf", n_ctx=128) as llm:
        got = llama_cpp.logits(llm, TEXT)
        tokens = llama_cpp.greedy(llm, TEXT[:20], 8)
    # a wrong bit, scale or row order moves logits by their own size (std ~0.35), not by ~0.015
    assert np.abs(got - ref).max() < 2.5 * activation_error
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.95
    ours = load_export(tmp_path / "export")
    with torch.no_grad():
        expected = ours.generate(torch.tensor([TEXT[:20]]), max_new_tokens=8, do_sample=False)[0, 20:].tolist()
    assert tokens == expected


@pytest.mark.parametrize("method,params,says", [
    ("pbllm_qat", dict(salient_ratio=0.1), "salient"),
    ("dyngroup", dict(groups=4), "levels"),
    ("w11a14", dict(), "group bit"),
    ("gptq", dict(bits=8), "bits=8"),
    ("rtn_binary", dict(act_bits=4), "act_bits=4"),
])
def test_what_ggml_cannot_hold_is_one_clear_error_and_no_file(method, params, says, tmp_path):
    packed_tiny(method, params, "int8", {}, tmp_path)
    with pytest.raises(QATError, match=says) as e:
        write_gguf(tmp_path / "export", tmp_path / "m.gguf")
    assert f"method={method}" in str(e.value) and "\n" not in str(e.value)


def test_a_failure_while_writing_leaves_no_file(tmp_path, monkeypatch):
    packed_tiny("rtn_binary", {}, "int8", WIDE, tmp_path)

    def disk_full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(QATError, match="could not write .*m.gguf: No space left on device"):
        write_gguf(tmp_path / "export", tmp_path / "m.gguf")
    assert not [p.name for p in tmp_path.iterdir() if p.name != "export"]  # neither the file nor a temp one


def test_byte_level_bpe_tokenizer_keys_by_hand():
    from qat.export.gguf import bpe_tokenizer_keys

    tok = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]},
           "decoder": {"type": "ByteLevel"}, "pre_tokenizer": {"type": "ByteLevel", "use_regex": True},
           "added_tokens": [{"id": 3, "content": "<s>", "special": True}, {"id": 4, "content": "</s>", "special": True}],
           "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                                       {"Sequence": {"id": "A", "type_id": 0}}]}}
    keys = bpe_tokenizer_keys(tok, {"eos_token": "</s>"}, 7, None)
    assert keys["tokens"] == ["a", "b", "ab", "<s>", "</s>", "[PAD5]", "[PAD6]"]  # padded to the embedding's rows
    assert keys["types"] == [1, 1, 1, 3, 3, 5, 5]
    assert keys["merges"] == ["a b"] and keys["pre"] == "gpt2"
    assert (keys["bos"], keys["eos"], keys["add_bos"]) == (3, 4, True)  # BOS from the post-processor's template
    with pytest.raises(QATError, match="--pre NAME"):
        bpe_tokenizer_keys(dict(tok, pre_tokenizer={"type": "Sequence"}), {"eos_token": "</s>"}, 7, None)
    with pytest.raises(QATError, match="no end-of-text token"):
        bpe_tokenizer_keys(tok, {}, 7, None)
    with pytest.raises(QATError, match="only 4 rows"):
        bpe_tokenizer_keys(tok, {"eos_token": "</s>"}, 4, None)


@pytest.mark.slow
def test_the_embedded_defaults_tokenizer_json_gives_its_ggufs_vocabulary():
    """An independent oracle for the tokenizer.json path: the embedded default's tokenizer.json
    (transformers' conversion of its GGUF) must give back the GGUF's own tokens, types and merges."""
    from qat.export.gguf import tokenizer_files_keys
    from qat.models.load import embedded_default_dir, embedded_default_gguf

    reader = gguf.GGUFReader(str(embedded_default_gguf()))
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    keys = tokenizer_files_keys(embedded_default_dir(), 49152, "smollm")
    assert keys["tokens"] == field("tokenizer.ggml.tokens")
    assert keys["types"] == field("tokenizer.ggml.token_type")
    assert keys["merges"] == field("tokenizer.ggml.merges")
    assert keys["eos"] == field("tokenizer.ggml.eos_token_id")


def test_the_command_line_says_what_is_wrong_in_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "qat.export.gguf", str(tmp_path / "nowhere")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "no such folder" in res.stderr
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    res = subprocess.run([sys.executable, "-m", "qat.export.gguf", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "corrupt" in res.stderr


def test_a_run_with_export_gguf_writes_the_file_and_the_readme_snippet_runs_it(compose, tmp_path):
    from pathlib import Path

    from qat.pipeline import run

    cfg = compose(["experiment=q1_0", "debug=fast", f"hydra.run.dir={tmp_path}"])
    res = run(cfg, tmp_path)
    g = res["gguf"]
    assert g["bytes"] == (tmp_path / "model.gguf").stat().st_size
    assert g["types"]["Q1_0"] > 0 and g["types"]["Q4_0"] > 0  # rows of 128 (ffn_down) and of 64
    # the command line writes the same file from the run folder
    res = subprocess.run([sys.executable, "-m", "qat.export.gguf", str(tmp_path), "--out", str(tmp_path / "cli.gguf")],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "bits per weight" in res.stdout
    assert (tmp_path / "cli.gguf").read_bytes() == (tmp_path / "model.gguf").read_bytes()
    # the README's llama-cpp-python snippet, verbatim but for the path, in a fresh process
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = next(b for b in readme.split("```python")[1:] if "from llama_cpp import Llama" in b).split("```")[0]
    res = subprocess.run([sys.executable, "-c", snippet.replace("outputs/.../model.gguf", str(tmp_path / "model.gguf"))],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    ours = load_export(tmp_path / "export")
    prompt = list(b"The history of the city")
    with torch.no_grad():
        expected = ours.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):]
    # llama.cpp's greedy text is the packed model's (the tiny model's bytes decoded)
    assert res.stdout.rstrip("\n") == bytes(i for i in expected.tolist() if i < 256).decode("utf-8", "replace")


@pytest.mark.parametrize("overrides,says", [
    (["salient_ratio=0.1"], "salient"),
    (["method.group_size=16"], "groups of 16 are not whole ggml blocks of 32"),
    (["export.folder=false"], "drop export.folder=false"),
])
def test_a_setting_ggml_cannot_hold_fails_before_training(overrides, says, compose, tmp_path):
    from qat.pipeline import run

    cfg = compose(["experiment=q1_0", "debug=fast", f"hydra.run.dir={tmp_path / 'run'}"] + overrides)
    with pytest.raises(QATError, match=says):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("amx", [True, False])
def test_builds_with_amx_load_without_repacked_buffers(amx, tmp_path, monkeypatch):
    """llama.cpp's AMX matmul segfaults on Q4_0 / Q4_1 layers on Sapphire Rapids-class CPUs: where
    the build has it, llama() keeps the weights out of the extra (repacked) buffers, only there."""
    import llama_cpp.llama_cpp as low

    packed_tiny("rtn_binary", {}, "int8", WIDE, tmp_path)
    write_gguf(tmp_path / "export", tmp_path / "m.gguf")
    monkeypatch.setattr(llama_cpp, "built_with_amx", lambda: amx)
    default = low.llama_model_default_params
    with llama_cpp.llama(tmp_path / "m.gguf", n_ctx=128) as llm:
        assert llm.model_params.use_extra_bufts is (not amx)
        assert np.isfinite(llama_cpp.logits(llm, TEXT)).all()
    assert low.llama_model_default_params is default
