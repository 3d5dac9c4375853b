"""LoRA (Hu et al. 2021) through peft: low-rank adapters A·B added to the chosen linear layers."""

from __future__ import annotations

import re
from typing import Literal

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from pydantic import Field

from peftlab.config import MethodConfig
from peftlab.errors import MethodError
from peftlab.methods.registry import MethodSpec, register_method


class LoraConfig(MethodConfig):
    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0, description="Rank of the adapter matrices.")
    alpha: int = Field(16, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names (suffix match), a regex string, or 'all-linear'.",
    )
    bias: Literal["none", "all", "lora_only"] = "none"


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct leaf names of the model's linear layers, for error messages."""
    return sorted(
        {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    )


def check_targets(model: torch.nn.Module, targets: list[str] | str) -> None:
    """Fail with the model's module names when a target matches nothing."""
    if targets == "all-linear":
        return
    names = [name for name, _ in model.named_modules()]
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in names):
            raise MethodError(
                f"target_modules regex {targets!r} matches no module; linear modules: {', '.join(linear_module_names(model))}"
            )
        return
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise MethodError(
            f"target_modules {missing} match no module; linear modules: {', '.join(linear_module_names(model))}"
        )


def peft_lora_config(cfg: LoraConfig) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        bias=cfg.bias,
        task_type="CAUSAL_LM",
    )


def prepare(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    check_targets(model, cfg.target_modules)
    return get_peft_model(model, peft_lora_config(cfg))


register_method(
    MethodSpec("lora", LoraConfig, prepare, summary="low-rank adapters on chosen linear layers (peft)")
)
