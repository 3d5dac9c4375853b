"""Trainer callbacks: the structured log (log.jsonl) that reports and plots are built from."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


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
        from peftlab.resources import gradient_bytes

        if model is not None and not self._measured:
            self.gradient_bytes = gradient_bytes(model)

    def on_optimizer_step(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any
    ) -> None:
        from peftlab.resources import optimizer_state_bytes

        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        if inner is not None and hasattr(inner, "state") and not self._measured:
            self.optimizer_state_bytes = optimizer_state_bytes(inner)
            self._measured = True
