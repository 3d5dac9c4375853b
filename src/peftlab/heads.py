"""What kind of output a model has, read from the model itself (never from the method's name).

The training path, the trainer and the evaluation ask `is_sequence_classifier(model)`: a model that
ends in class logits (transformers' *ForSequenceClassification, possibly inside a peft wrapper) has
no LM head, so it has no token loss to chunk, no perplexity and no generated text.
`write_task_labels` puts a classification task's label names (and the pad id its batches use) into
the model config, the conventional Hugging Face place a head method reads them from.
"""

from __future__ import annotations

from typing import Any

import torch

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
