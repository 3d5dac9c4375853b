"""The transformers Trainer with the chunked causal-LM loss (loss.py) plugged into compute_loss.

compute_loss is the Trainer's documented extension point. The model is asked for one position of
logits only (`logits_to_keep=1`) plus its hidden states, and the loss is computed from the final
hidden states chunk by chunk. Whether that equals the model's own loss is checked once on a real
batch before training (`chunked_loss_agrees`): an architecture that scales or soft-caps its logits
falls back to the stock loss, and the manifest says which loss ran.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer, default_data_collator

from peftlab.data.task import TaskData
from peftlab.errors import MethodError
from peftlab.model.chunked_loss import CHUNK_ROWS, IGNORE_INDEX, chunked_lm_loss
from peftlab.model.structure import is_sequence_classifier, output_head


def chunked_forward_loss(
    model: Any, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
) -> tuple[torch.Tensor, Any]:
    inputs = dict(inputs)
    labels = inputs.pop("labels")  # (B, T)
    outputs = model(**inputs, logits_to_keep=1, output_hidden_states=True)
    hidden = outputs.hidden_states[-1]  # (B, P + T, H)
    # Prompt tuning prepends P virtual tokens; like peft, give them no labels, so that the last
    # virtual position still predicts the first real token.
    extra = hidden.shape[1] - labels.shape[1]
    if extra > 0:
        labels = torch.nn.functional.pad(labels, (extra, 0), value=IGNORE_INDEX)  # (B, P + T)
    head = output_head(model)
    assert head is not None, "chunked loss needs an output head (checked by chunked_loss_agrees)"
    return chunked_lm_loss(hidden, head, labels, num_items_in_batch, CHUNK_ROWS), outputs


def chunked_loss_agrees(model: Any, batch: dict[str, Any], rtol: float = 1e-3) -> tuple[bool, str]:
    """Does the chunked loss equal the model's own loss on `batch`? (ok, reason when not)."""
    if output_head(model) is None:
        return False, "the model has no output embeddings"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            own = model(**batch).loss
            chunked, _ = chunked_forward_loss(model, batch)
    except (TypeError, ValueError, AttributeError) as exc:  # a forward without logits_to_keep
        return False, f"the model's forward does not support it ({type(exc).__name__})"
    finally:
        model.train(was_training)
    if own is None or not torch.isclose(chunked.float(), own.float(), rtol=rtol, atol=1e-5):
        return False, f"it differs from the model's own loss ({float(chunked):.5f} vs {float(own):.5f})"
    return True, ""


def choose_loss(setting: str, model: Any, task: TaskData, device: torch.device) -> str:
    """'chunked' or 'standard': auto takes the chunked loss when it equals the model's own on a
    real training example; asking for chunked where it does not agree is an error."""
    if setting == "standard" or is_sequence_classifier(model):  # a head's loss is over classes, not tokens
        return "standard"
    first = {
        k: v.to(device) if isinstance(v, torch.Tensor) else v
        for k, v in (task.collator or default_data_collator)([task.train_dataset[0]]).items()
    }
    ok, why = chunked_loss_agrees(model, first)
    if ok:
        return "chunked"
    if setting == "chunked":
        raise MethodError(
            f"train.loss=chunked cannot be used with this model: {why}; use train.loss=standard"
        )
    print(f"using the model's own loss: the chunked loss {why}")
    return "standard"


class PeftlabTrainer(Trainer):
    """Trainer whose training loss is the chunked causal-LM loss when `chunked_loss` is set.

    A sequence classifier's own loss is the mean over its micro-batch: transformers passes it
    num_items_in_batch (its forward takes **kwargs) and then does not divide by the accumulation
    steps, but GenericForSequenceClassification never hands that count to its loss. compute_loss
    therefore rescales that mean to (sum over the micro-batch) / (examples in the accumulated batch),
    so 4 micro-batches of 1 give the gradients of 1 batch of 4."""

    def __init__(self, *args: Any, chunked_loss: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.chunked_loss = chunked_loss
        self.batch_mean_loss = is_sequence_classifier(self.model)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if self.batch_mean_loss and "labels" in inputs and num_items_in_batch is not None:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            if self.model_accepts_loss_kwargs:  # else the Trainer divides by the accumulation steps
                loss = loss * inputs["labels"].ne(IGNORE_INDEX).sum() / num_items_in_batch
            return (loss, outputs) if return_outputs else loss
        if not self.chunked_loss or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = chunked_forward_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch is summed over processes; DDP averages gradients (as the stock path).
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss
