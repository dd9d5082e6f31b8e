"""python eval.py run_dir=outputs/...   Reload a run's export/ (packed form, no training code)
and measure its perplexity on the run's held-out test split (split=validation: on its validation split, where
knobs are chosen); compare with results.json.
`data=<option> ...` (e.g. data=text data.train=a.txt data.test=b.txt) measures it on other text."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from qat.errors import QATError, check_choice


def evaluate(cfg: DictConfig) -> dict:
    from qat.data import LMDataModule
    from qat.eval import perplexity
    from qat.export import load_export
    from qat.models.load import load_tokenizer

    run_dir = Path(cfg.run_dir)
    run_cfg_path = run_dir / "config.yaml"
    if not run_cfg_path.exists():
        raise QATError(f"run_dir={str(run_dir)!r} is not a run folder (no config.yaml)")
    run_cfg = OmegaConf.load(run_cfg_path)
    split = cfg.get("split") or "test"  # a config composed without eval.yaml's key: the test split
    check_choice("split", split, ["test", "validation"])
    if cfg.lm_eval.tasks:  # task names first: not after the whole perplexity pass
        from qat.eval.harness import task_manager

        task_manager(list(cfg.lm_eval.tasks), cfg.lm_eval.include_path)
    model = load_export(run_dir / "export", device=cfg.device)
    tok = load_tokenizer(OmegaConf.to_container(run_cfg.model, resolve=True))
    own_data = cfg.get("data") is None
    data_cfg = OmegaConf.to_container(run_cfg.data if own_data else cfg.data, resolve=True)
    if not own_data:
        from qat.pipeline import check_data_files
        check_data_files(data_cfg)
    data = LMDataModule(data_cfg, tok, getattr(tok, "name_or_path", "tokenizer"), seed=int(run_cfg.seed))
    seq_len = int(cfg.eval.seq_len or run_cfg.eval.seq_len)
    windows = cfg.eval.max_windows if cfg.eval.max_windows is not None else run_cfg.eval.max_windows
    t0 = time.time()
    ppl, n = perplexity(model, data.tokens[split], seq_len, windows, desc=f"ppl {split} (export, packed)")
    out = {"run_dir": str(run_dir), "device": cfg.device, "data": data_cfg.get("name"), "split": split,
           "ppl_packed_export": ppl, "eval_tokens": n, "seconds": time.time() - t0}
    results = run_dir / "results.json"
    if results.exists() and own_data and split == "test":
        out["ppl_final_recorded"] = json.loads(results.read_text())["ppl"]["final"]
    if cfg.lm_eval.tasks:
        from qat.eval.harness import run_lm_eval

        le = cfg.lm_eval
        out["lm_eval"] = run_lm_eval(model, tok, list(le.tasks), le.include_path, le.limit, le.num_fewshot,
                                     int(le.batch_size), cfg.device)
        if results.exists():  # the accuracies join the run's results
            from qat.io import atomic_write_bytes

            recorded = json.loads(results.read_text())
            recorded["lm_eval"] = out["lm_eval"]
            atomic_write_bytes(results, json.dumps(recorded, indent=1).encode())
            if recorded.get("wandb"):  # ... and the W&B run that trained the model
                from qat.eval.harness import log_to_training_run

                log_to_training_run(recorded["wandb"], out["lm_eval"])
    print(json.dumps(out, indent=1))
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> dict:
    try:
        return evaluate(cfg)
    except QATError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
