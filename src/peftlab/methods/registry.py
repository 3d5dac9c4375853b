"""The method registry: each methods/<name>.py registers one MethodSpec with one call.

The training path, the estimator and evaluation ask the spec for everything method-specific (model
preparation, load options, optimizer, what is saved and how it loads back) and never test a
method's name. Every field but the config class, `prepare` and the summary has a default that means
"nothing special", so callers use the fields as they are. The name is the config class's
`name: Literal[...]`, written once.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from peftlab.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from peftlab.config.sections import MethodConfig, TrainConfig

PrepareFn = Callable[["PreTrainedModel", Any], "torch.nn.Module"]
OptimizerFn = Callable[["torch.nn.Module", Any, "TrainConfig"], "torch.optim.Optimizer | None"]
LoadOptionsFn = Callable[[Any, "torch.dtype"], dict[str, Any]]
TrainerOptionsFn = Callable[[Any], dict[str, Any]]
HeadFn = Callable[["PreTrainedModel", Any], "PreTrainedModel"]
FlagFn = Callable[[Any], bool]
Head = Literal["causal_lm", "sequence_classification"]
Artifact = Literal["adapter", "model"]


def no_optimizer(model: Any, cfg: Any, train: Any) -> None:
    return None


def no_options(cfg: Any, *args: Any) -> dict[str, Any]:
    return {}


def never(cfg: Any) -> bool:
    return False


@dataclass(frozen=True)
class MethodSpec:
    """What a fine-tuning method contributes to a run."""

    config_cls: type[MethodConfig]
    prepare: PrepareFn
    """Turns a loaded base model into the model to train (freezes, wraps, injects adapters)."""
    summary: str
    make_optimizer: OptimizerFn = no_optimizer
    """Builds the optimizer when the method needs its own (LoRA+); None: the Trainer's, as
    `trainer_options` configure it."""
    load_options: LoadOptionsFn = no_options
    """Extra keyword arguments for from_pretrained (e.g. a quantisation config)."""
    trainer_options: TrainerOptionsFn = no_options
    """Extra TrainingArguments (e.g. optim='galore_adamw' or 'adamw_bnb_8bit'): reuses transformers'
    own optimizer integrations instead of re-implementing them."""
    artifact: Artifact = "adapter"
    """What training saves: 'adapter' (peft weights over the unchanged base) or 'model' (every
    weight); also the name of the folder in the run."""
    head: Head = "causal_lm"
    """What the prepared model outputs: next-token logits, or class logits over data.label_names
    (then the data are (prompt, class index) rows and evaluation argmaxes the class logits)."""
    build_head: HeadFn | None = None
    """For a head other than causal_lm: turns the loaded causal LM into the head model that shares
    its body, before any adapter; `prepare` calls it, and `peftlab eval` calls it before loading
    the saved adapter (which holds the trained head too)."""
    checkpoints_activations: FlagFn = never
    """Whether the method's own preparation turns gradient checkpointing on (QLoRA's k-bit
    preparation can), so the estimate counts checkpointed activations."""

    @property
    def name(self) -> str:
        return method_name(self.config_cls)

    @property
    def saves_adapter(self) -> bool:
        return self.artifact == "adapter"

    def optimizer_arguments(self, cfg: MethodConfig, train: TrainConfig) -> dict[str, Any]:
        """The TrainingArguments that decide the optimizer the Trainer builds (type, learning
        rate, weight decay, the method's own options): training and the estimator use the same."""
        return {"learning_rate": train.lr, "weight_decay": train.weight_decay, **self.trainer_options(cfg)}

    def attach_trained(self, model: Any, folder: Path) -> Any:
        """The trained adapter in `folder` over `model` (the base, or its head model), for
        evaluation; only for methods that save an adapter."""
        if not self.saves_adapter:
            raise ValueError(f"method {self.name!r} saves a whole model, not an adapter")
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(folder), is_trainable=False)


def method_name(config_cls: type[MethodConfig]) -> str:
    """The single value of the config class's `name: Literal[...]` field."""
    annotation = config_cls.model_fields["name"].annotation
    values = typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()
    if len(values) != 1 or not isinstance(values[0], str):
        raise ValueError(f"{config_cls.__name__}.name must be Literal['<method name>'] (one string)")
    return values[0]


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method; a second method with the same name is a programming error."""
    name = spec.name  # refuses a config class without a one-string Literal name
    default = spec.config_cls.model_fields["name"].default
    if default != name:
        raise ValueError(f"{spec.config_cls.__name__}.name defaults to {default!r}, not {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is already registered")
    if spec.head != "causal_lm" and spec.build_head is None:
        raise ValueError(f"method {name!r} has head {spec.head!r} but no build_head")
    _REGISTRY[name] = spec
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
