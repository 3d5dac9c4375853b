"""GaLore (Zhao et al. 2024): full-parameter training whose gradients for the targeted linear layers
are projected to rank r, so their optimizer state is r/d of AdamW's. Other parameters train with
plain AdamW. The optimizer is galore-torch through transformers' own integration (optim=galore_*),
including its 8-bit and layer-wise variants, rather than a re-implementation.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from peftlab.errors import MethodError
from peftlab.methods.peft_common import TargetedConfig, check_targets, matching_modules
from peftlab.methods.registry import MethodSpec, register_method


class GaloreConfig(TargetedConfig):
    name: Literal["galore"] = "galore"
    rank: int = Field(128, gt=0, description="Rank of the gradient projection.")
    update_proj_gap: int = Field(200, gt=0, description="Steps between recomputing the projection (an SVD).")
    scale: float = Field(0.25, gt=0, description="Scale of the projected update.")
    proj_type: Literal["std", "reverse_std", "left", "right", "full"] = "std"
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    optimizer: Literal["adamw", "adamw_8bit", "adafactor"] = "adamw"
    layerwise: bool = Field(
        False,
        description="Step each layer's optimizer during backward (saves gradient memory; no accumulation).",
    )


def prepare(model: torch.nn.Module, cfg: GaloreConfig) -> torch.nn.Module:
    check_targets(model, cfg.target_modules)
    for name in matching_modules(model, cfg.target_modules):
        module = model.get_submodule(name)
        if isinstance(module, torch.nn.Linear) and cfg.rank > min(module.in_features, module.out_features):
            raise MethodError(
                f"galore.rank={cfg.rank} is larger than layer {name} "
                f"({module.out_features}x{module.in_features}); use rank <= {min(module.in_features, module.out_features)}"
            )
    model.requires_grad_(True)
    return model


def trainer_options(cfg: GaloreConfig) -> dict[str, Any]:
    return {
        "optim": f"galore_{cfg.optimizer}" + ("_layerwise" if cfg.layerwise else ""),
        "optim_target_modules": cfg.target_modules,
        "optim_args": f"rank={cfg.rank},update_proj_gap={cfg.update_proj_gap},scale={cfg.scale},proj_type={cfg.proj_type}",
    }


register_method(
    MethodSpec(
        GaloreConfig,
        prepare,
        summary="full training with low-rank gradient projection (galore-torch)",
        trainer_options=trainer_options,
        artifact="model",
    )
)
