"""The speed-ups and memory savings around Trainer.train, entered together and undone together.

Each one is a context manager of its own room (model/ for the ones every device gets, cpu/ for the
CPU-only ones) that changes something for the block alone and restores it in `finally`, so a run
that raises, or a second run in the same process, finds every forward, hook and table as before.
`training_speedups` decides which of them switch on for this run (the config asks; the CPU-only
ones also need the CPU and fp32, where their equality with the stock path is tested; private
internals must exist) and records, for metrics.json, what was really in effect and why not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from peftlab.config.sections import TrainConfig
from peftlab.cpu import attention_blocks, malloc, onednn_linear
from peftlab.model.lean_mlp import lean_gated_mlps
from peftlab.model.norm_recompute import norms_recomputed
from peftlab.model.structure import decoder_layers


@dataclass
class Speedups:
    """What each speed-up did in this run: 'on', or 'off: <why>', and its counts once training ended."""

    state: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    _tallies: dict[str, Any] = field(default_factory=dict, repr=False)

    def settle(self) -> None:
        """Read the tallies that count during training (call after the block)."""
        recompute, blocks = self._tallies.get("recompute"), self._tallies.get("blocks")
        # norm outputs rebuilt in backward (0 where none was worth it: bf16, checkpointing)
        self.counts["norm_outputs_recomputed"] = recompute.recipes if recompute is not None else 0
        # attention calls that skipped the masked half, training and validation forwards alike
        self.counts["attention_calls_in_blocks"] = blocks.calls if blocks is not None else 0


def _why_off(asked: bool, *conditions: tuple[bool, str]) -> str | None:
    if not asked:
        return "not asked"
    return next((why for holds, why in conditions if not holds), None)


@contextlib.contextmanager
def training_speedups(
    cfg: TrainConfig, model: torch.nn.Module, device: torch.device, dtype: torch.dtype
) -> Iterator[Speedups]:
    """Within the block, the speed-ups `cfg` asks for that apply here are on; yields their record."""
    layers = decoder_layers(model)
    cpu, fp32 = device.type == "cpu", dtype == torch.float32
    on_cpu = (cpu, f"device is {device.type}, not cpu")
    in_fp32 = (fp32, f"dtype is {str(dtype).removeprefix('torch.')}; proven in float32 only")
    glibc = (malloc.has_glibc(), "no glibc malloc in this process")
    why = {
        "lean_mlp": _why_off(cfg.lean_mlp),
        "recompute_norms": _why_off(
            cfg.recompute_norms, (layers is not None, "no decoder layer stack found")
        ),
        "heap_trim": _why_off(cfg.heap_trim_layers > 0, on_cpu, glibc),
        "causal_attention_blocks": _why_off(
            cfg.causal_attention_blocks,
            on_cpu,
            in_fp32,
            (attention_blocks.unavailable() is None, str(attention_blocks.unavailable())),
        ),
        "onednn_forward": _why_off(
            cfg.onednn_forward,
            on_cpu,
            in_fp32,
            (onednn_linear.unavailable() is None, str(onednn_linear.unavailable())),
        ),
    }
    record = Speedups(
        state={name: "on" if reason is None else f"off: {reason}" for name, reason in why.items()}
    )
    with contextlib.ExitStack() as stack:
        record.counts["lean_mlps"] = stack.enter_context(
            lean_gated_mlps(model if why["lean_mlp"] is None else None)
        )
        record.counts["heap_trims_per_forward"] = stack.enter_context(
            malloc.heap_trimmed_every(layers if why["heap_trim"] is None else None, cfg.heap_trim_layers)
        )
        record._tallies["recompute"] = stack.enter_context(
            norms_recomputed(layers if why["recompute_norms"] is None else None)
        )
        record._tallies["blocks"] = stack.enter_context(
            attention_blocks.causal_attention_in_blocks(why["causal_attention_blocks"] is None)
        )
        record.counts["onednn_linear_layers"] = stack.enter_context(
            onednn_linear.frozen_linears_on_onednn(model if why["onednn_forward"] is None else None)
        )
        yield record
