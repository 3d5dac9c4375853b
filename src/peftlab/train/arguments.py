"""The Trainer's arguments from a run config: `training_arguments` maps RunConfig (and the method's
optimizer fields) onto transformers' TrainingArguments; `evaluation_arguments` its validation part.

Validation: eval_loss is transformers' evaluation loss on the validation set
(TaskData.validation_dataset): the mean over validation batches of each batch's mean token
cross-entropy, batches weighted by their number of rows; the same computation for every method, on
the same batches in the same order. When: every `train.eval_steps` steps; unset, at every checkpoint
(`train.save_steps`), else at the end of each epoch (and of training). The best checkpoint is the
saved one with the lowest eval_loss; transformers only knows it when evaluation and saving happen
at the same step, hence the rule in config/run.py that eval_steps equals save_steps when both are
set. transformers' own checkpoint rotation is off (callbacks.KeepNewestAndBest rotates instead).

Trackers: `train.report_to` goes to the Trainer as it is, with the run folder's name as `run_name`
and `train.tracker_group` as Trackio's `project`; train/trackers.py places and groups the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from peftlab.config.run import RunConfig
from peftlab.config.sections import TrainConfig
from peftlab.methods import MethodSpec


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


def training_arguments(
    cfg: RunConfig,
    spec: MethodSpec,
    run_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
    has_validation: bool = False,
) -> TrainingArguments:
    t = cfg.train
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum_steps,
        **spec.optimizer_arguments(cfg.method, t),  # learning rate, weight decay, optim
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        **evaluation_arguments(t, has_validation),  # eval_loss, best checkpoint; rotation in a callback
        seed=t.seed,
        data_seed=t.seed,
        gradient_checkpointing=t.gradient_checkpointing,
        bf16=dtype == torch.bfloat16 and device.type == "cuda",
        use_cpu=device.type == "cpu",
        report_to=list(t.report_to),  # train/trackers.py: where each tracker writes, group, config
        run_name=run_dir.name,
        project=t.tracker_group or "peftlab",  # Trackio's project (transformers uses it for nothing else)
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
    )
