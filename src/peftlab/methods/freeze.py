"""Partial fine-tuning: train only the last k decoder layers and/or named modules; the rest stays frozen."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from peftlab.config.sections import MethodConfig
from peftlab.errors import MethodError
from peftlab.methods.registry import MethodSpec, register_method
from peftlab.model.structure import decoder_layers


class FreezeConfig(MethodConfig):
    name: Literal["freeze"] = "freeze"
    last_layers: int = Field(2, ge=0, description="Train the last k decoder layers.")
    modules: list[str] = Field(
        default_factory=list, description="Also train modules whose name ends with one of these."
    )
    train_embeddings: bool = Field(False, description="Train the input embeddings (and a tied output head).")
    train_head: bool = Field(
        False, description="Train the output head (the embeddings too when they are tied)."
    )

    @model_validator(mode="after")
    def _something_trains(self) -> FreezeConfig:
        if self.last_layers == 0 and not self.modules and not (self.train_embeddings or self.train_head):
            raise ValueError(
                "freeze trains nothing: set last_layers > 0, modules, train_embeddings or train_head"
            )
        return self


def prepare(model: torch.nn.Module, cfg: FreezeConfig) -> torch.nn.Module:
    model.requires_grad_(False)
    layers = decoder_layers(model)
    if layers is None:
        raise MethodError("freeze: could not find the model's decoder layers (num_hidden_layers)")
    if cfg.last_layers > len(layers):
        raise MethodError(f"freeze.last_layers={cfg.last_layers} but the model has {len(layers)} layers")
    for layer in list(layers)[len(layers) - cfg.last_layers :]:
        layer.requires_grad_(True)
    names = [name for name, _ in model.named_modules()]
    for target in cfg.modules:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        if not hits:
            raise MethodError(f"freeze.modules: {target!r} matches no module")
        for name in hits:
            model.get_submodule(name).requires_grad_(True)
    if cfg.train_embeddings:
        model.get_input_embeddings().requires_grad_(True)  # type: ignore[operator]
    if cfg.train_head:
        model.get_output_embeddings().requires_grad_(True)  # type: ignore[operator]
    return model


register_method(
    MethodSpec(
        FreezeConfig,
        prepare,
        summary="train the last k layers / named modules only",
        artifact="model",
    )
)
