"""Validation loss during training, and checkpoint rotation that keeps the newest N plus the best.

eval_loss is transformers' evaluation loss on the validation set (TaskData.validation_dataset): the
mean over validation batches of each batch's mean token cross-entropy, batches weighted by their
number of rows. It is the same computation for every method, on the same batches in the same order.

When: every `train.eval_steps` steps; unset, at every checkpoint (`train.save_steps`), else at the
end of each epoch (and of training). The best checkpoint is the saved one with the lowest eval_loss;
transformers only knows it when evaluation and saving happen at the same step, hence the rule in
config.RunConfig that eval_steps equals save_steps when both are set.

Rotation. transformers (5.x, `trainer_utils.rotate_checkpoints` and the end of
`Trainer._inner_training_loop`) keeps at most `save_total_limit` folders, protecting the newest and the
best inside that count, and with a limit of 1 it deletes every checkpoint but the best once training
ends. So it does not keep "the newest N plus the best": with N=1 the newest is gone at the end, with
N=2 only one recent checkpoint survives beside an old best. peftlab turns its rotation off
(save_total_limit=None) and rotates in `on_save`: the newest N checkpoints up to the current step,
plus the best; folders of later steps (left by a run killed after the checkpoint it resumed from) go.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from peftlab.config import TrainConfig


def evaluation_arguments(t: TrainConfig, has_validation: bool) -> dict[str, Any]:
    """TrainingArguments for validation loss and best-checkpoint tracking."""
    args: dict[str, Any] = {"save_total_limit": None}  # KeepNewestAndBest rotates instead
    if not has_validation:
        return {**args, "eval_strategy": "no"}
    steps = t.eval_steps or t.save_steps
    return {
        **args,
        "eval_strategy": "steps" if steps else "epoch",
        "eval_steps": steps,
        "per_device_eval_batch_size": t.batch_size,
        "prediction_loss_only": True,  # never gather logits (rows x length x vocab) over the set
        "metric_for_best_model": "eval_loss",
        "greater_is_better": False,
    }


def _checkpoints(folder: Path) -> dict[int, Path]:
    found = {}
    for path in folder.glob("checkpoint-*"):
        step = path.name.split("-", 1)[1]
        if step.isdigit() and path.is_dir():
            found[int(step)] = path
    return found


class KeepNewestAndBest(TrainerCallback):
    """After each save: keep the newest `limit` checkpoints and the best one; None keeps all."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.limit is None or not state.is_world_process_zero:
            return
        folders = _checkpoints(Path(args.output_dir))
        keep = set(sorted(step for step in folders if step <= state.global_step)[-self.limit :])
        best = Path(state.best_model_checkpoint).resolve() if state.best_model_checkpoint else None
        for step, path in folders.items():
            if step not in keep and path.resolve() != best:
                shutil.rmtree(path, ignore_errors=True)


def validation_summary(state: Any, run_dir: Path, since_step: int = 0) -> dict[str, Any]:
    """best_checkpoint (relative to the run folder; None when no checkpoint was saved at an
    evaluation), best_eval_loss, final_eval_loss, and the seconds spent on validation after `since_step`
    (this process's share, to take out of the training speed)."""
    evals = [h for h in state.log_history if "eval_loss" in h]
    best = Path(state.best_model_checkpoint) if state.best_model_checkpoint else None
    return {
        "best_checkpoint": str(best.resolve().relative_to(run_dir.resolve()))
        if best is not None and best.is_dir()
        else None,
        "best_eval_loss": state.best_metric if evals else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "eval_count": len(evals),
        "eval_seconds": sum(h.get("eval_runtime", 0.0) for h in evals if h["step"] > since_step),
    }
