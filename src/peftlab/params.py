"""Parameter counts, printed in peft's format for every method (peft or not)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParamCounts:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100 * self.trainable / self.total if self.total else 0.0

    def line(self) -> str:
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


def count_parameters(model: torch.nn.Module) -> ParamCounts:
    """Counts unique parameters (tied weights once). bitsandbytes 4-bit weights store two values per
    byte, so their numel is doubled back to the logical size, as peft does."""
    trainable = total = 0
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n = n * 2  # packed uint8 storage: two 4-bit values per element
        total += n
        if param.requires_grad:
            trainable += n
    return ParamCounts(trainable, total)
