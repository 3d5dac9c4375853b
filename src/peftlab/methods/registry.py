"""The method registry: each methods/<name>.py registers one MethodSpec with one call.

The training path asks the spec for everything method-specific (model preparation, load options,
optimizer) and never tests a method's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from peftlab.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from peftlab.config import MethodConfig, TrainConfig

PrepareFn = Callable[["PreTrainedModel", Any], "torch.nn.Module"]
OptimizerFn = Callable[["torch.nn.Module", Any, "TrainConfig"], "torch.optim.Optimizer | None"]
LoadOptionsFn = Callable[[Any, "torch.dtype"], dict[str, Any]]
TrainerOptionsFn = Callable[[Any], dict[str, Any]]
HeadFn = Callable[["PreTrainedModel", Any], "PreTrainedModel"]
Head = Literal["causal_lm", "sequence_classification"]


@dataclass(frozen=True)
class MethodSpec:
    """What a fine-tuning method contributes to a run."""

    name: str
    config_cls: type[MethodConfig]
    prepare: PrepareFn
    """Turns a loaded base model into the model to train (freezes, wraps, injects adapters)."""
    summary: str
    make_optimizer: OptimizerFn | None = None
    """Builds the optimizer when the method needs its own (e.g. GaLore); None: AdamW from Trainer."""
    load_options: LoadOptionsFn | None = None
    """Extra keyword arguments for from_pretrained (e.g. a quantisation config)."""
    trainer_options: TrainerOptionsFn | None = None
    """Extra TrainingArguments (e.g. optim='galore_adamw' or 'adamw_bnb_8bit'): reuses transformers'
    own optimizer integrations instead of re-implementing them."""
    artifact: str = "adapter"
    """Name of the folder the trained weights are saved to: 'adapter' or 'model'."""
    head: Head = "causal_lm"
    """What the prepared model outputs: next-token logits, or class logits over data.label_names
    (then the data are (prompt, class index) rows and evaluation argmaxes the class logits)."""
    build_head: HeadFn | None = None
    """For a head other than causal_lm: turns the loaded causal LM into the head model that shares
    its body, before any adapter; `prepare` calls it, and `peftlab eval` calls it before loading
    the saved adapter (which holds the trained head too)."""


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method; a second method with the same name is a programming error."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered")
    if spec.head != "causal_lm" and spec.build_head is None:
        raise ValueError(f"method {spec.name!r} has head {spec.head!r} but no build_head")
    if spec.config_cls.model_fields["name"].annotation is str:
        raise ValueError(f"{spec.config_cls.__name__}.name must be Literal[{spec.name!r}]")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}; registered methods: {', '.join(sorted(_REGISTRY))}"
        ) from None


def method_names() -> list[str]:
    return sorted(_REGISTRY)
