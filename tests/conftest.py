import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(ROOT))


@pytest.fixture
def compose():
    """compose(overrides) -> the resolved train config, as Hydra builds it for train.py."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def _compose(overrides=(), config_name="train"):
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)

    return _compose
