"""IA3 (Liu et al. 2022): learned vectors that rescale keys, values and the MLP's inner activations (peft)."""

from __future__ import annotations

from typing import Literal

import torch
from peft import IA3Config as PeftIA3Config
from pydantic import Field

from peftlab.methods.peft_common import TargetedConfig, check_targets, wrap
from peftlab.methods.registry import MethodSpec, register_method


class IA3Config(TargetedConfig):
    name: Literal["ia3"] = "ia3"
    target_modules: list[str] | str = Field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward_modules: list[str] = Field(
        default_factory=lambda: ["down_proj"], description="Targets whose input (not output) is rescaled."
    )


def prepare(model: torch.nn.Module, cfg: IA3Config) -> torch.nn.Module:
    check_targets(model, cfg.feedforward_modules)
    peft_cfg = PeftIA3Config(
        target_modules=cfg.target_modules, feedforward_modules=cfg.feedforward_modules, task_type="CAUSAL_LM"
    )
    return wrap(model, peft_cfg, cfg.target_modules)


register_method(MethodSpec(IA3Config, prepare, summary="rescaling vectors on keys, values, MLP (peft)"))
