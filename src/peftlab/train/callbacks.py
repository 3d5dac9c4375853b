"""Every Trainer callback of a run, in one place: the structured log (log.jsonl) that reports and
plots are built from, the progress bar, the measured memory split, complete-checkpoint markers,
graceful Ctrl-C, checkpoint rotation (newest N plus the best) and the padding tally.

Callbacks that change something outside the Trainer (a signal handler, a forward hook) do it in a
context manager the recipe enters (`GracefulInterrupt.installed`, `PaddingTally.attached`), so the
change is undone in `finally` even when training raises; transformers calls `on_train_end` only
when training ends normally.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from peftlab.data.class_rows import ClassCollator
from peftlab.data.packing import PackedCollator
from peftlab.runs import atomic_write_json, now_iso
from peftlab.sizing.resources import gradient_bytes, optimizer_state_bytes
from peftlab.train.checkpoints import COMPLETE_MARKER, checkpoint_folders


class JsonlLogger(TrainerCallback):
    """Appends one JSON line per Trainer log: step, loss, lr, real (non-pad) tokens/s; and one per
    validation (step, epoch, eval_loss, eval_seconds), whose time is left out of the next tokens/s."""

    def __init__(self, path: Path):
        self.path = path
        self._last_time: float | None = None
        self._last_tokens = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not logs or not state.is_world_process_zero:
            return
        if "eval_loss" in logs:
            self._write(
                {
                    "step": state.global_step,
                    "epoch": round(state.epoch or 0.0, 4),
                    "eval_loss": logs["eval_loss"],
                    "eval_seconds": logs.get("eval_runtime"),
                    "time": time.time(),
                }
            )
            self._last_time = time.perf_counter()
            return
        if "loss" not in logs:
            return
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen
        elapsed = now - (self._last_time or now)
        record = {
            "step": state.global_step,
            "epoch": round(state.epoch or 0.0, 4),
            "loss": logs["loss"],
            "lr": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens_seen": tokens,
            "tokens_per_second": (tokens - self._last_tokens) / elapsed if elapsed > 0 else None,
            "time": time.time(),
        }
        self._last_time, self._last_tokens = now, tokens
        self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


class LossProgressBar(ProgressCallback):
    """transformers' progress bar, with the latest loss and lr in the bar instead of a printed dict
    per log line (which buries the bar on a terminal)."""

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        bar = getattr(self, "training_bar", None)
        if bar is not None and logs and "loss" in logs:
            bar.set_postfix(
                loss=f"{float(logs['loss']):.4f}", lr=f"{float(logs.get('learning_rate', 0)):.2e}"
            )


def read_log(path: Path, kind: Literal["train", "eval", "all"] = "train") -> list[dict[str, Any]]:
    """log.jsonl lines: training ("loss"), validation ("eval_loss") or all."""
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if kind == "all":
        return lines
    return [r for r in lines if ("loss" if kind == "train" else "eval_loss") in r]


class MemorySplit(TrainerCallback):
    """Measures gradient and optimizer-state bytes at the first optimizer step of a train() call.

    Gradients exist only between backward and the step (the Trainer sets them to None after), so
    they are read just before the step; the optimizer state is complete just after it. Both keep
    their size from then on, so later steps (the hot path) are not walked again."""

    def __init__(self) -> None:
        self.gradient_bytes = 0
        self.optimizer_state_bytes = 0
        self._measured = False

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        if model is not None and not self._measured:
            self.gradient_bytes = gradient_bytes(model)

    def on_optimizer_step(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any
    ) -> None:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        if inner is not None and hasattr(inner, "state") and not self._measured:
            self.optimizer_state_bytes = optimizer_state_bytes(inner)
            self._measured = True


class CheckpointMarker(TrainerCallback):
    """Marks checkpoint-<step> complete once the Trainer has finished writing it."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir() and state.is_world_process_zero:
            atomic_write_json(folder / COMPLETE_MARKER, {"step": state.global_step, "written_at": now_iso()})


class GracefulInterrupt(TrainerCallback):
    """First Ctrl-C (or SIGTERM, what `timeout`, batch schedulers, Kubernetes and Ray's task
    cancellation send): finish the current step, save a checkpoint, stop. A second one stops at once.

    The handlers are installed by `installed()` around training and restored in its `finally`,
    whatever ends training."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: saving a checkpoint after this step (again to stop at once)", flush=True)

    @contextlib.contextmanager
    def installed(self) -> Iterator[bool]:
        """Within the block, SIGINT and SIGTERM ask for a graceful stop; yields whether the handlers
        are in place (only the main thread can install them: elsewhere, e.g. a Ray worker, the
        signals keep their behaviour)."""
        previous = {}
        try:
            for signum in self.SIGNALS:
                previous[signum] = signal.signal(signum, self._handle)
        except ValueError:
            yield False
            return
        try:
            yield True
        finally:
            for signum, handler in previous.items():
                if signal.getsignal(signum) == self._handle:  # ours: give the old one back
                    signal.signal(signum, handler)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.requested:
            control.should_save = True
            control.should_training_stop = True


class KeepNewestAndBest(TrainerCallback):
    """After each save: keep the newest `limit` checkpoints and the best one; None keeps all."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.limit is None or not state.is_world_process_zero:
            return
        folders = checkpoint_folders(Path(args.output_dir))
        keep = set(sorted(step for step in folders if step <= state.global_step)[-self.limit :])
        best = Path(state.best_model_checkpoint).resolve() if state.best_model_checkpoint else None
        for step, path in folders.items():
            if step not in keep and path.resolve() != best:
                shutil.rmtree(path, ignore_errors=True)


TALLY_KEY = "peftlab_padding_tally"
TALLY_FILE = "peftlab-padding.json"


class PaddingTally(TrainerCallback):
    """Real and pad tokens of every batch the model trained on, counted where the model gets them.

    The collator pads each batch to its longest row, so the share of pad tokens depends on which
    rows the sampler put together; counting the dataset's rows cannot give it. The collator puts
    (real tokens, pad tokens) into its batch, and a forward pre-hook on the model removes that entry
    before the model sees it and counts it only in training mode: validation batches, and batches
    a data loader fetched ahead but training never used, do not count. The counts are written into
    every checkpoint and read back on resume, so a resumed run reports the whole run. Under DDP
    each process counts its own batches; process 0's share is what is reported."""

    def __init__(self, checkpoint: Path | None = None) -> None:
        self.real = self.pad = 0
        saved = checkpoint / TALLY_FILE if checkpoint is not None else None
        if saved is not None and saved.is_file():
            counts = json.loads(saved.read_text())
            self.real, self.pad = int(counts["real_tokens"]), int(counts["pad_tokens"])

    @contextlib.contextmanager
    def attached(self, model: torch.nn.Module, collator: Any) -> Iterator[bool]:
        """Within the block, `collator` tags its batches and `model`'s forward counts them; yields
        False when the collator cannot (fixed-length blocks: their padding is known from the
        data). Hook and tag are removed in `finally`, so batches built afterwards reach the model
        untagged even when training raised."""
        if not isinstance(collator, (PackedCollator, ClassCollator)):
            yield False
            return
        collator.tally_key = TALLY_KEY
        handle = model.register_forward_pre_hook(self._count, with_kwargs=True)
        try:
            yield True
        finally:
            handle.remove()
            collator.tally_key = None

    def _count(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        tally = kwargs.pop(TALLY_KEY, None)
        if tally is not None and module.training:
            self.real += int(tally[0])
            self.pad += int(tally[1])
        return args, kwargs

    def as_dict(self) -> dict[str, Any]:
        total = self.real + self.pad
        return {
            "real_tokens": self.real,
            "pad_tokens": self.pad,
            "padding_waste": self.pad / total if total else 0.0,
        }

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Registered before CheckpointMarker: a checkpoint marked complete has its counts.
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir() and state.is_world_process_zero:
            atomic_write_json(folder / TALLY_FILE, self.as_dict())
