"""Experiment trackers (`train.report_to`): where each one writes, how a sweep's runs are grouped,
and the run's config and final metrics on top of what transformers' integrations log (its
TrainingArguments, the model config, every training log: arguments.py passes `report_to` and the
run folder's name as `run_name`).

    tensorboard  transformers' TensorBoardCallback writes to <run>/tensorboard; a writer of ours in
                 the same folder adds the run config (text `peftlab/config`) before training and the
                 final metrics (scalars `final/...`) at the end. Runs group by folder: point
                 `tensorboard --logdir` at a sweep folder.
    wandb        the run is started here (project: $WANDB_PROJECT, else peftlab; name: the run
                 folder's; group: `train.tracker_group`; files under <run>/wandb; the flattened run
                 config as `peftlab.<key>`), so the Trainer's WandbCallback reports into it instead
                 of starting its own; the final metrics go to its summary (`final/...`), and it
                 is finished at the end (exit code 1 when the run failed). Offline mode is the
                 user's choice (WANDB_MODE=offline).
    mlflow       MLFLOW_EXPERIMENT_NAME = `train.tracker_group` for the block (transformers reads it
                 when training starts); the tracking store is the user's ($MLFLOW_TRACKING_URI,
                 else mlflow's default in the working folder).
    trackio      `train.tracker_group` is its project (TrainingArguments.project, arguments.py).

MLflow and Trackio get transformers' logging only: their integrations end the run when training
ends, before the tuned model is scored, and peftlab adds nothing to them.

Process-wide effects, all undone when the block ends (docs/architecture.md, "Global effects"): the
MLflow variable; for a wandb run started here, wandb's service (its process, threads and
$WANDB_SERVICE) when this block started it, and the sys.excepthook / sys.exit wrappers wandb.init
installs, where they are still wandb's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from peftlab.config.run import RunConfig
from peftlab.errors import ConfigError

Sink = Callable[[dict[str, float], int], None]  # final metrics, global step

# package(s) each tracker needs (the Trainer's callback and, for tensorboard, our writer)
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}

# the final metrics sent to trackers: name -> path in metrics.json
HEADLINE = {
    "tokens_per_second": "tokens_per_second",
    "peak_memory_bytes": "memory_split.peak_bytes",  # the CUDA allocator's peak, else peak RSS
    "train_seconds": "train_seconds",
    "train_steps": "train_steps",
    "real_tokens_trained": "real_tokens_trained",
    "train_loss": "train_loss",
    "final_logged_loss": "final_logged_loss",
    "best_eval_loss": "best_eval_loss",
    "final_eval_loss": "final_eval_loss",
    "trainable_params": "trainable_params",
    "padding_waste": "padding_waste",
    "forgetting": "forgetting.forgetting",
}
EVALUATED = (
    "perplexity",
    "token_accuracy",
    "mean_nll",
    "units.bits_per_byte",
    "classification.accuracy",
    "classification.macro_f1",
    "generation.bleu4",
    "generation.rouge_l",
    "generation.answer_perplexity",
)


def check_installed(report_to: Sequence[str]) -> None:
    """A tracker whose package is missing fails here, in one line, before a run folder exists."""
    missing = [name for name in report_to if importlib.util.find_spec(PACKAGES[name]) is None]
    if missing:
        raise ConfigError(
            f"train.report_to: {', '.join(missing)} not installed (pip install {' '.join(PACKAGES[m] for m in missing)})"
        )


def flat_config(cfg: RunConfig) -> dict[str, Any]:
    """The run config as dotted keys (`train.lr`), lists kept as values."""
    flat: dict[str, Any] = {}

    def walk(tree: dict[str, Any], prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(cfg.model_dump(mode="json"), "")
    return flat


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The final metrics trackers get: speed, peak memory, losses, and each side's scores."""
    paths = {
        **HEADLINE,
        **{f"{side}.{key}": f"{side}.{key}" for side in ("base", "tuned") for key in EVALUATED},
    }
    found = {}
    for name, path in paths.items():
        value: Any = metrics
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            found[name] = value
    return found


@contextlib.contextmanager
def reporting(cfg: RunConfig, run_dir: Path, trainer: Any) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Trackers set up for training and the evaluation after it; yields `report(metrics)`, which
    sends the final metrics (`headline`) to the trackers that take them. Nothing without
    `train.report_to`."""
    report_to, group = cfg.train.report_to, cfg.train.tracker_group
    with contextlib.ExitStack() as stack:
        sinks: list[Sink] = []
        if "tensorboard" in report_to:
            sinks.append(stack.enter_context(_tensorboard(cfg, run_dir / "tensorboard", trainer)))
        if "wandb" in report_to:
            sinks.append(stack.enter_context(_wandb_run(cfg, run_dir, group)))
        if "mlflow" in report_to and group:
            stack.enter_context(_environment({"MLFLOW_EXPERIMENT_NAME": group}))

        def report(metrics: dict[str, Any]) -> None:
            final = headline(metrics)
            for sink in sinks:
                sink(final, trainer.state.global_step)

        yield report


@contextlib.contextmanager
def _tensorboard(cfg: RunConfig, folder: Path, trainer: Any) -> Iterator[Sink]:
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(folder)  # else <run>/checkpoints/runs/<time>_<host>
    writer = SummaryWriter(log_dir=str(folder))
    try:
        writer.add_text("peftlab/config", f"```yaml\n{cfg.to_yaml()}```")
        writer.flush()

        def sink(final: dict[str, float], step: int) -> None:
            for name, value in final.items():
                writer.add_scalar(f"final/{name}", value, step)
            writer.flush()

        yield sink
    finally:
        writer.close()


@contextlib.contextmanager
def _wandb_run(cfg: RunConfig, run_dir: Path, group: str | None) -> Iterator[Sink]:
    import wandb

    config = {f"peftlab.{key}": value for key, value in flat_config(cfg).items()}
    if wandb.run is not None:  # the caller's own run: the Trainer reports into it; it stays theirs
        wandb.run.config.update(config, allow_val_change=True)
        yield lambda final, step: _summarise(wandb.run, final)
        return
    service_before = "WANDB_SERVICE" in os.environ  # wandb sets it when it starts its service
    hooks_before = sys.excepthook, sys.exit
    run = None
    failed = True
    try:
        run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "peftlab"),
            name=run_dir.name,
            group=group,
            dir=str(run_dir),
            config=config,
        )
        yield lambda final, step: _summarise(run, final)
        failed = False
    finally:
        if run is not None:
            run.finish(exit_code=1 if failed else 0)
        if not service_before and "WANDB_SERVICE" in os.environ:  # started here: stop it
            wandb.teardown()
            os.environ.pop("WANDB_SERVICE", None)
        if sys.excepthook is not hooks_before[0] and _is_wandbs(sys.excepthook):
            sys.excepthook = hooks_before[0]
        if sys.exit is not hooks_before[1] and _is_wandbs(sys.exit):
            sys.exit = hooks_before[1]


def _summarise(run: Any, final: dict[str, float]) -> None:
    if run is not None:
        run.summary.update({f"final/{name}": value for name, value in final.items()})


def _is_wandbs(function: Any) -> bool:
    """A hook wandb installed (a method of its exit-hooks object), not one someone set since."""
    return type(getattr(function, "__self__", None)).__module__.startswith("wandb.")


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Environment variables set for the block; the old values (or their absence) back after it."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
