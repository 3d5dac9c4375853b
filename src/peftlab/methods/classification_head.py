"""Sequence classification with a trained head: LoRA on the body plus a linear `score` head that reads
the hidden state of each prompt's last real token (transformers' *ForSequenceClassification, peft
task_type SEQ_CLS, which trains and saves `score` through modules_to_save).

Why it exists next to the default recipe (a causal LM trained on "prompt + label" and scored by label
log-likelihood): for a task with a fixed label set a head is the classic, direct fit. Its loss is a
cross-entropy over the classes themselves, not over label spellings and their tokenisation, and it
costs one forward per example at evaluation (and serving) time instead of one per label. The price:
the tuned model no longer writes text, so perplexity, forgetting and sample answers are skipped for
it (with the reason in metrics.json). The base model is still scored by label log-likelihood, so the
before/after comparison uses the same metrics (evaluation/classification.py).

The head model shares the already loaded body: it is built on the meta device from the same config
(num_labels and id2label/label2id from the task, which the training path writes into the config),
its body attribute (`base_model_prefix`) is set to the loaded body, and only the head is created on
the body's device and dtype, from its own seeded generator. No weight is loaded twice.
`head_only` turns the method into a linear probe: the body stays frozen and only the head trains.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from peftlab.errors import MethodError
from peftlab.methods.lora import LoraConfig, lora_plus_optimizer, peft_lora_config
from peftlab.methods.peft_common import wrap
from peftlab.methods.registry import MethodSpec, register_method


class ClassificationHeadConfig(LoraConfig):
    name: Literal["classification_head"] = "classification_head"  # type: ignore[assignment]
    head_only: bool = Field(
        False,
        description="Linear probe: train the classification head only, the body frozen (peft still "
        "wraps it, its LoRA adapters frozen at their identity init, so saving and loading are the same).",
    )
    head_seed: int = Field(
        0, description="Seed of the head's initialisation (its own generator, independent of the run's RNG)."
    )

    @model_validator(mode="after")
    def _probe_keeps_the_base(self) -> ClassificationHeadConfig:
        if self.head_only and self.init != "default":
            # pissa/olora rewrite the base weights at init; a frozen probe must see the base as it is
            raise ValueError(
                "method.head_only needs method.init=default (pissa/olora change the base weights)"
            )
        return self


def build_head(model: Any, cfg: ClassificationHeadConfig) -> Any:
    """The architecture's *ForSequenceClassification over `model`'s loaded body (shared, not copied)."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(model.config)  # labels from config.id2label (written by the training path)
    config.problem_type = "single_label_classification"
    if config.pad_token_id is None:  # the training path writes the pad id of its batches; else EOS
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    body = getattr(model, model.base_model_prefix, None)
    if not isinstance(body, torch.nn.Module):
        raise MethodError(f"classification_head: the model has no body attribute {model.base_model_prefix!r}")
    first = next(body.parameters())
    try:
        with torch.device("meta"):  # the meta body is dropped below: nothing is allocated twice
            head_model = AutoModelForSequenceClassification.from_config(config, dtype=first.dtype)
    except ValueError:
        raise MethodError(
            f"classification_head: transformers has no sequence-classification model for model type "
            f"{config.model_type!r}"
        ) from None
    prefix = head_model.base_model_prefix
    setattr(head_model, prefix, body)
    generator = torch.Generator().manual_seed(cfg.head_seed)
    std = float(getattr(config.get_text_config(), "initializer_range", 0.02) or 0.02)
    for name, child in head_model.named_children():
        if name == prefix or first.device.type == "meta":
            continue
        child.to_empty(device=first.device)
        with torch.no_grad():  # transformers' own init for linear layers: N(0, initializer_range), bias 0
            for param in child.parameters():
                values = torch.randn(param.shape, generator=generator) * std if param.dim() > 1 else None
                param.copy_(values if values is not None else torch.zeros(param.shape))
    return head_model


def prepare(model: Any, cfg: ClassificationHeadConfig) -> torch.nn.Module:
    wrapped = wrap(build_head(model, cfg), peft_lora_config(cfg, task_type="SEQ_CLS"), cfg.target_modules)
    if cfg.head_only:  # only peft's trainable copy of the head (modules_to_save) keeps its gradient
        for name, param in wrapped.named_parameters():
            if param.requires_grad and "modules_to_save" not in name:
                param.requires_grad_(False)
    return wrapped


register_method(
    MethodSpec(
        ClassificationHeadConfig,
        prepare,
        summary="LoRA + a trained classification head on the last token (peft SEQ_CLS); classification data",
        make_optimizer=lora_plus_optimizer,
        head="sequence_classification",
        build_head=build_head,
    )
)
