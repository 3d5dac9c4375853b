"""Structure helpers that read a model as it is (never the method's name): the decoder stack, the
output head, whether the model ends in class logits, parameter counts, and the task labels a head
reads from the config.

The training path, the trainer and the evaluation ask `is_sequence_classifier(model)`: a model that
ends in class logits (transformers' *ForSequenceClassification, possibly inside a peft wrapper) has
no LM head, so it has no token loss to chunk, no perplexity and no generated text.
`write_task_labels` puts a classification task's label names (and the pad id its batches use) into
the model config, the conventional Hugging Face place a head method reads them from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
from torch import nn

NO_LM_HEAD = "a classification-head model has no LM head"


def unwrapped(model: Any) -> Any:
    """The transformers model under a peft wrapper (or the model itself)."""
    getter = getattr(model, "get_base_model", None)
    return getter() if callable(getter) else model


def is_sequence_classifier(model: Any) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    inner = unwrapped(model)
    return isinstance(inner, torch.nn.Module) and type(inner).__name__ in set(
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values()
    )


def write_task_labels(model: Any, label_names: list[str] | None, pad_id: int | None = None) -> None:
    """config.id2label / label2id from the task's label names (no-op without them) and the pad id the
    task's batches are padded with (a sequence classifier finds each row's last real token by it).
    Harmless for causal LMs: their forward reads neither."""
    if not label_names:
        return
    config = unwrapped(model).config
    config.id2label = dict(enumerate(label_names))
    config.label2id = {name: i for i, name in enumerate(label_names)}
    if pad_id is not None:
        config.pad_token_id = pad_id


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The stack of decoder blocks: the ModuleList whose length is the config's layer count."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    return None


def output_head(model: Any) -> nn.Module | None:
    """The model's output projection (through a peft wrapper too), or None."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, nn.Module) else None


def is_plain_linear(head: nn.Module | None) -> TypeGuard[nn.Linear]:
    """A bias-free nn.Linear itself (not a LoRA-wrapped or quantised one): the fused kernel applies."""
    return type(head) is nn.Linear and head.bias is None


@dataclass(frozen=True)
class ParamCounts:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100 * self.trainable / self.total if self.total else 0.0

    def line(self) -> str:
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


def count_parameters(model: torch.nn.Module) -> ParamCounts:
    """Counts unique parameters (tied weights once). bitsandbytes 4-bit weights store two values per
    byte, so their numel is doubled back to the logical size, as peft does."""
    trainable = total = 0
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n = n * 2  # packed uint8 storage: two 4-bit values per element
        total += n
        if param.requires_grad:
            trainable += n
    return ParamCounts(trainable, total)
