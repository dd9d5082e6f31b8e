"""lm-evaluation-harness on an export, offline: a local multiple-choice task of json lines."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
ROOT = Path(__file__).resolve().parents[1]


def local_task(folder: Path) -> Path:
    """A 6-question multiple-choice task whose right answer repeats the question's last word."""
    folder.mkdir(parents=True)
    docs = [{"question": f"the word is {w}. again:", "choices": [f" {w}", " zebra", " qqqq"], "answer": 0}
            for w in ("river", "city", "music", "water", "light", "king")]
    (folder / "data.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (folder / "qat_tiny_choice.yaml").write_text(
        "task: qat_tiny_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'data.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n")
    return folder


def test_eval_cli_runs_lm_eval_on_the_packed_export_and_records_it(compose, tmp_path, monkeypatch):
    """The accuracies join the run's results.json and the W&B run that trained the model."""
    from qat.pipeline import run

    run_dir = tmp_path / "run"
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose(["model=tiny", "data=tiny", "logger=wandb", f"logger.save_dir={run_dir}", "eval.max_windows=2",
                   "eval.seq_len=64", "init=rtn", "trainer.max_steps=0", f"hydra.run.dir={run_dir}"])
    run(cfg, run_dir)
    run_id = json.loads((run_dir / "results.json").read_text())["wandb"]["id"]
    tasks = local_task(tmp_path / "tasks")
    out = subprocess.run([sys.executable, "eval.py", f"run_dir={run_dir}", "lm_eval.tasks=[qat_tiny_choice]",
                          f"lm_eval.include_path={tasks}"], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, WANDB_MODE="offline", HF_DATASETS_OFFLINE="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    acc = json.loads((run_dir / "results.json").read_text())["lm_eval"]["qat_tiny_choice"]
    assert 0.0 <= acc["acc,none"] <= 1.0 and "acc_stderr,none" in acc
    records = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(records) == 2  # the training run, then the evaluation resuming the same id
    assert b"lm_eval/qat_tiny_choice/acc/none" in b"".join(f.read_bytes() for f in records[1].glob("*.wandb"))


def test_an_unknown_task_is_refused_before_the_perplexity_pass(tmp_path, monkeypatch):
    """eval.py ... lm_eval.tasks=[no_such_task]: one clear line, and the export is never loaded
    (it failed only after the whole perplexity pass)."""
    from omegaconf import OmegaConf

    import eval as eval_cli
    from qat.errors import QATError

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("seed: 0\n")

    def never(*args, **kwargs):
        raise AssertionError("the export was loaded before the task names were checked")

    monkeypatch.setattr("qat.export.load_export", never)
    cfg = OmegaConf.create({"run_dir": str(run_dir), "device": "cpu", "lm_eval": {"tasks": ["no_such_task"],
                                                                                 "include_path": None}})
    with pytest.raises(QATError, match=r"unknown task\(s\) \['no_such_task'\]"):
        eval_cli.evaluate(cfg)
