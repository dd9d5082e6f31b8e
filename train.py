"""python train.py method=pbllm_qat salient_ratio=0.1   (see conf/train.yaml)"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from qat.errors import QATError, TrainingDiverged, TrainingInterrupted


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Returns the objective of a sweep (Hydra's Optuna sweeper minimizes it): the last validation
    perplexity of training, never the test split's; NaN when the run did not validate."""
    from qat.pipeline import run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        results = run(cfg, run_dir)
        if results.get("status") == "plan":  # plan=true: nothing ran, nothing is kept
            shutil.rmtree(run_dir, ignore_errors=True)
        return float(results.get("ppl", {}).get("val_last", float("nan")))
    except QATError as e:
        # no half-written run folder: a failed run leaves nothing behind
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        # the run folder stays: its last good checkpoint and results.json (status "diverged")
        print(f"error: {e} ({run_dir / 'results.json'})", file=sys.stderr)
        sys.exit(3)
    except OSError as e:
        # a full disk or a vanished folder while writing the run's files: every file is written
        # under a temp name and renamed, so none is half-written; what was written stays
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: could not write the run's files: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(4)
    except TrainingInterrupted as e:
        # the run folder stays: its checkpoints and results.json (status "interrupted")
        print(f"error: {e} ({run_dir / 'results.json'})", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    from qat.config_checks import moved_knob_error

    moved = moved_knob_error(sys.argv[1:])  # before Hydra, whose own message would not name the new knob
    if moved:
        print(f"error: {moved}", file=sys.stderr)
        sys.exit(2)
    main()
