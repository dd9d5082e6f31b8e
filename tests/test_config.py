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
    if group == "experiment":
        assert cfg.trainer.max_steps > 0


def test_headline_overrides(compose):
    cfg = compose(["method=pbllm_qat", "salient_ratio=0.2", "model=tiny", "data=tiny", "logger=none",
                   "trainer.max_steps=3", "eval.max_windows=2", "seed=7", "hydra.run.dir=/tmp/x"])
    assert cfg.method.salient_ratio == 0.2 and cfg.model.source == "tiny" and cfg.logger is None
    assert cfg.trainer.max_steps == 3 and cfg.eval.max_windows == 2 and cfg.seed == 7


def test_experiment_preset_is_the_paper_setting(compose):
    cfg = compose(["experiment=pbllm_llama2_7b"])
    assert cfg.optim.lr == 2e-5 and cfg.optim.weight_decay == 0 and cfg.optim.name == "adamw8bit"
    assert cfg.trainer.max_steps == 10000 and cfg.data.seq_len == 2048
    assert cfg.trainer.precision == "bf16-mixed"
