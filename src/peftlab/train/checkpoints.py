"""Checkpoints on disk: which are complete, which one a resumed run continues from, the log lines
it trains again, and the best checkpoint of a finished run.

transformers' Trainer writes a checkpoint folder file by file; a kill in the middle leaves a folder
that looks like a checkpoint but is not. A marker file written (atomically) by
callbacks.CheckpointMarker, from `on_save`, which the Trainer calls only after every file of the
checkpoint is written, tells complete ones apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError

COMPLETE_MARKER = "peftlab-complete.json"


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "manifest.json").is_file()


def newest_complete_checkpoint(run_dir: Path) -> Path | None:
    """The highest-step checkpoint whose marker exists; half-written folders are skipped."""
    folders = []
    for folder in (run_dir / "checkpoints").glob("checkpoint-*"):
        try:
            step = int(folder.name.split("-", 1)[1])
            json.loads((folder / COMPLETE_MARKER).read_text())
        except (ValueError, OSError, json.JSONDecodeError):
            continue
        folders.append((step, folder))
    return max(folders)[1] if folders else None


def checkpoint_to_resume(run_dir: Path) -> Path:
    if not run_dir.is_dir() or not is_run_dir(run_dir):
        raise PeftlabError(f"{run_dir} is not a peftlab run folder (no config.yaml and manifest.json)")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    if manifest.get("status") == "completed":
        raise PeftlabError(f"run {run_dir} already completed; start a new run instead of resuming it")
    checkpoint = newest_complete_checkpoint(run_dir)
    if checkpoint is None:
        raise PeftlabError(
            f"run {run_dir} has no complete checkpoint to resume from (set train.save_steps to write them)"
        )
    return checkpoint


def trim_log(log_path: Path, last_step: int) -> None:
    """Drop log lines after the checkpoint's step: those steps are trained again on resume."""
    if not log_path.is_file():
        return
    kept = [
        ln for ln in log_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= last_step
    ]
    log_path.write_text("".join(line + "\n" for line in kept))


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-", 1)[1])


def checkpoint_folders(folder: Path) -> dict[int, Path]:
    found = {}
    for path in folder.glob("checkpoint-*"):
        step = path.name.split("-", 1)[1]
        if step.isdigit() and path.is_dir():
            found[int(step)] = path
    return found


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
