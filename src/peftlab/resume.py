"""Crash safety for training: complete-checkpoint markers, graceful Ctrl-C, and resuming a run.

transformers' Trainer writes a checkpoint folder file by file; a kill in the middle leaves a folder
that looks like a checkpoint but is not. A marker file written (atomically) from `on_save`, which the
Trainer calls only after every file of the checkpoint is written, tells complete ones apart.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import FrameType
from typing import Any

from transformers import TrainerCallback

from peftlab.errors import PeftlabError
from peftlab.runs import atomic_write_json, now_iso

COMPLETE_MARKER = "peftlab-complete.json"


class CheckpointMarker(TrainerCallback):
    """Marks checkpoint-<step> complete once the Trainer has finished writing it."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir() and state.is_world_process_zero:
            atomic_write_json(folder / COMPLETE_MARKER, {"step": state.global_step, "written_at": now_iso()})


class GracefulInterrupt(TrainerCallback):
    """First Ctrl-C: finish the current step, save a checkpoint, stop. A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to stop at once)", flush=True)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread (e.g. a Ray worker): keep the default behaviour
            self._previous = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.requested:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


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
