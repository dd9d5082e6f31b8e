"""Every yaml composes; the documented overrides work."""
from pathlib import Path

import pytest

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUP_OPTIONS = [(g.name, y.stem) for g in sorted(CONF.iterdir()) if g.is_dir()
                 for y in sorted(g.glob("*.yaml"))]


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_every_yaml_composes(compose, group, option):
    cfg = compose([f"{group}={option}"])
    from omegaconf import OmegaConf

    resolved = OmegaConf.to_container(cfg, resolve=False)
    assert resolved["method"]["name"]
    if group in ("experiment", "hparams_search"):
        assert cfg.trainer.max_steps > 0


def test_headline_overrides(compose):
    cfg = compose(["method=pbllm_qat", "salient_ratio=0.2", "model=tiny", "data=tiny", "logger=none",
                   "trainer.max_steps=3", "eval.max_windows=2", "seed=7", "hydra.run.dir=/tmp/x"])
    assert cfg.method.salient_ratio == 0.2 and cfg.model.source == "tiny" and cfg.logger is None
    assert cfg.trainer.max_steps == 3 and cfg.eval.max_windows == 2 and cfg.seed == 7


@pytest.mark.parametrize("method", sorted(y.stem for y in (CONF / "method").glob("*.yaml")))
def test_every_method_takes_the_activation_and_smoothing_groups(compose, method):
    """The README's `method=<any> act=int4 smooth=smoothquant` composes and builds."""
    from qat.pipeline import method_from_cfg

    cfg = compose([f"method={method}", "act=int4", "smooth=smoothquant", "smooth.alphas=[0.25,0.5]"])
    built = method_from_cfg(cfg)
    assert built.act_bits == 4 and built.smooth is True and built.smooth_alphas == (0.25, 0.5)
    assert built.quantizes  # fp16 with INT4 inputs is W16A4: its layers are wrapped too
    assert not {"act_bits", "smooth", "smooth_alphas"} & set(cfg.method)  # one place each: the groups


def test_a_method_yaml_picks_its_own_activation_and_smoothing_defaults(compose):
    """pbllm_qat smooths with ARB-RC's column scales, w11a14 has INT4 inputs, the others neither;
    the command line (and an experiment preset) beats the method's default."""
    from qat.pipeline import method_from_cfg

    built = {m: method_from_cfg(compose([f"method={m}"])) for m in ("pbllm_qat", "w11a14", "gptq")}
    assert built["pbllm_qat"].smooth and built["pbllm_qat"].smooth_alphas == ("rc",) and built["pbllm_qat"].act_bits == 16
    assert built["w11a14"].act_bits == 4 and not built["w11a14"].smooth
    assert built["gptq"].act_bits == 16 and not built["gptq"].smooth
    assert method_from_cfg(compose(["method=w11a14", "act=none"])).act_bits == 16
    assert not method_from_cfg(compose(["method=pbllm_qat", "smooth=none"])).smooth
    assert not compose(["experiment=q1_0"]).smooth.enabled  # llama.cpp has no input scales
    rc = method_from_cfg(compose(["method=gptq", "smooth=rc"]))
    assert rc.smooth and rc.smooth_alphas == ("rc",)


def test_precision_auto_is_bf16_only_where_the_cpu_computes_it(monkeypatch):
    """trainer.precision=auto (the CPU default): bf16-mixed with AVX512-BF16 / AMX, fp32 without
    (emulated bf16 autocast measured 2.3x slower than fp32)."""
    from qat.train import precision

    zen4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
    skylake = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n"
    assert precision.cpu_has_native_bf16(zen4) and not precision.cpu_has_native_bf16(skylake)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda cpuinfo=None: False)
    assert precision.resolve_precision("auto", "cpu") == "32-true"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda cpuinfo=None: True)
    assert precision.resolve_precision("auto", "cpu") == "bf16-mixed"
    assert precision.resolve_precision("16-mixed", "cpu") == "16-mixed"  # explicit values pass through


def test_experiment_preset_is_the_paper_setting(compose):
    cfg = compose(["experiment=pbllm_llama2_7b_wikitext2"])
    assert cfg.optim.lr == 2e-5 and cfg.optim.weight_decay == 0 and cfg.optim.name == "adamw8bit"
    assert cfg.trainer.max_steps == 10000 and cfg.data.seq_len == 2048
    assert cfg.trainer.precision == "bf16-mixed"


def test_gpu_headline_preset_scales_the_cpu_recipe(compose):
    cpu, gpu = compose([]), compose(["experiment=headline_gpu"])
    assert gpu.method == cpu.method and gpu.distill == cpu.distill and gpu.train == cpu.train
    assert gpu.init.name == cpu.init.name and gpu.init.n_samples * gpu.init.seq_len > cpu.init.n_samples * cpu.init.seq_len
    assert gpu.trainer.accelerator == "gpu" and gpu.trainer.precision == "bf16-mixed"
    tokens = lambda c: c.trainer.max_steps * c.data.batch_size * c.data.seq_len
    assert tokens(gpu) > 20 * tokens(cpu)


def test_sweep_presets_sweep_what_they_say(compose):
    grid = compose(["experiment=grid_pbllm"])
    assert grid.hydra.mode.name == "MULTIRUN" and grid.method.name == "pbllm_qat"
    assert grid.hydra.sweeper.params.salient_ratio == "0.05,0.1,0.2,0.3"
    optuna = compose(["hparams_search=qat_optuna"])
    assert "optuna" in optuna.hydra.sweeper._target_.lower() and optuna.hydra.sweeper.direction == "minimize"
    assert set(optuna.hydra.sweeper.params) == {"optim.lr", "method.ste_clip", "distill.temperature"}
    assert optuna.trainer.val_check_interval == optuna.trainer.max_steps  # the objective is measured
