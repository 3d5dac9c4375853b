"""What the peft-based methods share: target checking and wrapping a model with a peft config."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from peft import get_peft_model
from pydantic import Field

from peftlab.config.sections import MethodConfig
from peftlab.errors import MethodError


class TargetedConfig(MethodConfig):
    """A method that injects modules into named layers."""

    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names (suffix match), a regex string, or 'all-linear'.",
    )


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct leaf names of the model's linear layers, for error messages."""
    return sorted(
        {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    )


def matching_modules(model: torch.nn.Module, targets: list[str] | str) -> list[str]:
    """Full names of the modules that `targets` selects, with peft's matching rules."""
    names = [name for name, _ in model.named_modules() if name]
    if targets == "all-linear":
        return [
            n
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
        ]
    if isinstance(targets, str):
        return [n for n in names if re.fullmatch(targets, n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


def check_targets(model: torch.nn.Module, targets: list[str] | str) -> None:
    """Fail with the model's module names when a target matches nothing."""
    available = ", ".join(linear_module_names(model))
    if isinstance(targets, str):
        if targets != "all-linear" and not matching_modules(model, targets):
            raise MethodError(
                f"target_modules regex {targets!r} matches no module; linear modules: {available}"
            )
        return
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise MethodError(f"target_modules {missing} match no module; linear modules: {available}")


def on_meta(model: torch.nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def wrap(model: torch.nn.Module, peft_config: Any, targets: list[str] | str | None = None) -> torch.nn.Module:
    if targets is not None:
        check_targets(model, targets)
    if on_meta(model) and getattr(peft_config, "init_lora_weights", True) not in (True, False, "gaussian"):
        # pissa / olora / loftq compute the adapters from the base weights, which a meta model (the
        # memory estimate's dry run) does not have; the default init gives the same shapes and counts.
        peft_config = dataclasses.replace(peft_config, init_lora_weights=True, loftq_config={})
    return get_peft_model(model, peft_config)
