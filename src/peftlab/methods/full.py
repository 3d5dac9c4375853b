"""Full fine-tuning: every parameter of the base model is trained (AdamW from the Trainer)."""

from __future__ import annotations

from typing import Literal

import torch

from peftlab.config import MethodConfig
from peftlab.methods.registry import MethodSpec, register_method


class FullConfig(MethodConfig):
    name: Literal["full"] = "full"


def prepare(model: torch.nn.Module, cfg: FullConfig) -> torch.nn.Module:
    model.requires_grad_(True)
    return model


register_method(MethodSpec("full", FullConfig, prepare, summary="train every parameter", artifact="model"))
