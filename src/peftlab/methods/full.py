"""Full fine-tuning: every parameter of the base model is trained (AdamW, or 8-bit AdamW from bitsandbytes)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from peftlab.config.sections import MethodConfig
from peftlab.methods.registry import MethodSpec, register_method


class FullConfig(MethodConfig):
    name: Literal["full"] = "full"
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw",
        description="adamw_8bit keeps optimizer state in 8 bits (bitsandbytes), a quarter of AdamW's.",
    )


def prepare(model: torch.nn.Module, cfg: FullConfig) -> torch.nn.Module:
    model.requires_grad_(True)
    return model


def trainer_options(cfg: FullConfig) -> dict[str, Any]:
    return {"optim": "adamw_bnb_8bit"} if cfg.optimizer == "adamw_8bit" else {}


register_method(
    MethodSpec(
        FullConfig,
        prepare,
        summary="train every parameter",
        trainer_options=trainer_options,
        artifact="model",
    )
)
