"""LoRA (Hu et al. 2021) through peft: low-rank adapters B·A added to the chosen linear layers.

DoRA and QLoRA reuse this module: DoRA is LoRA with `use_dora`, QLoRA is LoRA over a 4-bit base.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from peft import LoftQConfig
from peft import LoraConfig as PeftLoraConfig
from pydantic import Field

from peftlab.config.sections import TrainConfig
from peftlab.errors import MethodError
from peftlab.methods.peft_common import TargetedConfig, check_targets, linear_module_names, wrap
from peftlab.methods.registry import MethodSpec, register_method

__all__ = ["LoraConfig", "check_targets", "linear_module_names"]


class LoraConfig(TargetedConfig):
    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0, description="Rank of the adapter matrices.")
    alpha: int = Field(
        16,
        gt=0,
        description="Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rslora).",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    bias: Literal["none", "all", "lora_only"] = "none"
    rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = Field(
        "default",
        description="Adapter initialisation (peft's init_lora_weights). loftq needs a CUDA GPU "
        "(peft computes it there) and bitsandbytes.",
    )
    lora_plus_ratio: float | None = Field(
        None,
        gt=0,
        description="LoRA+: learning rate of B is this many times that of A (peft's LoRA+ optimizer).",
    )


def peft_lora_config(cfg: LoraConfig, use_dora: bool = False, task_type: str = "CAUSAL_LM") -> PeftLoraConfig:
    init: Any = True if cfg.init == "default" else cfg.init
    loftq: dict[str, Any] = {}
    if cfg.init == "loftq":
        if not torch.cuda.is_available():  # peft's loftq_init moves every weight to cuda
            raise MethodError(
                "method.init=loftq needs a CUDA GPU (peft computes LoftQ there); on this machine use "
                "init=default, gaussian, pissa or olora"
            )
        loftq = {"loftq_config": LoftQConfig(loftq_bits=4, loftq_iter=1)}  # peft's defaults, 4-bit nf4
    return PeftLoraConfig(
        **loftq,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        bias=cfg.bias,
        use_rslora=cfg.rslora,
        init_lora_weights=init,
        use_dora=use_dora,
        task_type=task_type,
    )


def prepare(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    return wrap(model, peft_lora_config(cfg), cfg.target_modules)


def lora_plus_optimizer(
    model: torch.nn.Module, cfg: LoraConfig, train: TrainConfig
) -> torch.optim.Optimizer | None:
    """peft's LoRA+ optimizer (AdamW with a larger learning rate for B), or None for plain AdamW."""
    if cfg.lora_plus_ratio is None:
        return None
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model,  # type: ignore[arg-type]
        torch.optim.AdamW,
        lr=train.lr,
        loraplus_lr_ratio=cfg.lora_plus_ratio,
        weight_decay=train.weight_decay,
    )


register_method(
    MethodSpec(
        LoraConfig,
        prepare,
        summary="low-rank adapters on chosen linear layers (peft)",
        make_optimizer=lora_plus_optimizer,
    )
)
