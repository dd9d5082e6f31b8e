"""Zero-shot accuracy with lm-evaluation-harness, through its own HFLM wrapper, on any model this
project builds (packed export, fake-quant or fp). Hub tasks download their datasets (network);
a task of local files (lm-eval's `include_path` + a yaml with `dataset_path: json`) runs offline.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from qat.errors import QATError


def task_manager(tasks: list[str], include_path: str | None = None) -> Any:
    """lm-eval's TaskManager, once every task name is known to it (checked before any other work)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise QATError("lm_eval.tasks needs lm-evaluation-harness: pip install -e '.[eval]'") from None
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise QATError(f"lm_eval.tasks: unknown task(s) {unknown}; see `lm_eval --tasks list`, or give "
                       "lm_eval.include_path=<folder of task yamls>")
    return manager


def run_lm_eval(model: nn.Module, tokenizer: Any, tasks: list[str], include_path: str | None = None,
                limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 1,
                device: str = "cpu") -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for every task (and group) lm-eval reports."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if not hasattr(tokenizer, "save_pretrained"):  # the tiny model's ByteTokenizer
        from qat.models.tokenizer import hf_byte_tokenizer

        tokenizer = hf_byte_tokenizer()
    manager = task_manager(tasks, include_path)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot)
    return {task: {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
            for task, metrics in out["results"].items()}


def log_to_training_run(wandb_run: dict[str, Any], accuracies: dict[str, dict[str, float]]) -> None:
    """Add the accuracies to the W&B run that trained the model (resumed by its id; offline runs
    become a second record of the same id, which `wandb sync` merges)."""
    import wandb

    flat = {f"lm_eval/{task}/{metric.replace(',', '/')}": value for task, metrics in accuracies.items()
            for metric, value in metrics.items() if isinstance(value, (int, float))}
    run = wandb.init(project=wandb_run["project"], id=wandb_run["id"], dir=wandb_run["dir"], resume="allow",
                     mode="offline" if wandb_run.get("offline", True) else None)
    run.log(flat)
    run.summary.update(flat)
    run.finish()
