"""DoRA (Liu et al. 2024): weight-decomposed LoRA, a magnitude vector plus a LoRA direction (peft use_dora)."""

from __future__ import annotations

from typing import Literal

import torch

from peftlab.methods.lora import LoraConfig, lora_plus_optimizer, peft_lora_config
from peftlab.methods.peft_common import wrap
from peftlab.methods.registry import MethodSpec, register_method


class DoraConfig(LoraConfig):
    name: Literal["dora"] = "dora"  # type: ignore[assignment]


def prepare(model: torch.nn.Module, cfg: DoraConfig) -> torch.nn.Module:
    return wrap(model, peft_lora_config(cfg, use_dora=True), cfg.target_modules)


register_method(
    MethodSpec(
        DoraConfig,
        prepare,
        summary="weight-decomposed LoRA (peft use_dora)",
        make_optimizer=lora_plus_optimizer,
    )
)
