"""Padding waste of the batches a run actually trained on, counted where the model receives them.

The collator pads each batch to its longest row, so the share of pad tokens depends on which rows
the sampler put together; counting the dataset's rows cannot give it. Instead the collator puts
(real tokens, pad tokens) of its batch into the batch, and a forward pre-hook on the model removes
that entry before the model sees it and counts it only in training mode. Validation batches, and
batches a data loader fetched ahead but training never used, therefore do not count. The counts are
written into every checkpoint and read back on resume, so a resumed run reports the whole run.
Under DDP each process counts its own batches; process 0's share is what is reported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from peftlab.data.classes import ClassCollator
from peftlab.data.packing import PackedCollator
from peftlab.runs import atomic_write_json

TALLY_KEY = "peftlab_padding_tally"
TALLY_FILE = "peftlab-padding.json"


class PaddingTally(TrainerCallback):
    """Real and pad tokens of every batch the model trained on."""

    def __init__(self, checkpoint: Path | None = None) -> None:
        self.real = self.pad = 0
        self._handle: Any = None
        self._collator: PackedCollator | ClassCollator | None = None
        saved = checkpoint / TALLY_FILE if checkpoint is not None else None
        if saved is not None and saved.is_file():
            counts = json.loads(saved.read_text())
            self.real, self.pad = int(counts["real_tokens"]), int(counts["pad_tokens"])

    def attach(self, model: torch.nn.Module, collator: Any) -> bool:
        """Make `collator` tag its batches and count them at `model`'s forward; False when the
        collator cannot (fixed-length blocks: their padding is known from the data)."""
        if not isinstance(collator, (PackedCollator, ClassCollator)):
            return False
        collator.tally_key = TALLY_KEY
        self._collator = collator
        self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)
        return True

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
        # Registered before resume.CheckpointMarker: a checkpoint marked complete has its counts.
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir() and state.is_world_process_zero:
            atomic_write_json(folder / TALLY_FILE, self.as_dict())

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._handle is not None:  # batches built after training go to the model untagged
            self._handle.remove()
            self._handle = None
        if self._collator is not None:
            self._collator.tally_key = None
