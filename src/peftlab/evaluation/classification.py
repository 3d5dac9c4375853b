"""Classification by label log-likelihood (any causal LM, no new head) or by a trained head.

For a causal LM the score of a label is the sum of the log-probabilities of the label's completion
tokens given the prompt (optionally divided by their count); the prediction is the best label. A
sequence classifier (methods/classification_head.py) predicts the argmax of its class logits.
Both feed the same `classification_metrics`. Prompts and completions come from the caller (the
data layer builds prompts).

`label_loglikelihoods` runs every prompt once for all K labels: one row per example holds the
prompt (left-padded) followed by every label's completion but its last token, kept apart by a 4D
attention mask (a completion sees the prompt and itself, never another completion) and placed at
the positions it would have right after the prompt. The positions that predict label tokens (the
prompt's last, then each completion token) are the last of every row, the same ones in each, so
the model's own output head runs on those alone (`logits_to_keep`): no logits, let alone a
log-softmax, for prompt positions. `label_loglikelihoods_reference` is the plain way (one forward
per (example, label) pair, the log-softmax over the whole vocabulary at every position); it scores
what the packed rows cannot serve (prompt and prefix tuning, which prepend virtual tokens; models
that are not transformers causal LMs) and is what the packed scores are checked against.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from peftlab.data.class_rows import right_pad
from peftlab.evaluation.perplexity import accepts_logits_to_keep
from peftlab.model.structure import unwrapped

PACKED_ATTENTION = ("sdpa", "eager")  # attention implementations that take a custom 4D float mask


@torch.no_grad()
def label_loglikelihoods_reference(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    completions: list[str],
    batch_size: int = 8,
    length_normalise: bool = False,
) -> torch.Tensor:
    """[N, K] score of completion k after prompt n, one forward per (prompt, completion) pair and the
    whole vocabulary's log-softmax at every position. Prompt and completion are tokenised apart so
    the completion's tokens are the same for every prompt; rows are right-padded, pads never count."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    comp_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    if any(len(c) == 0 for c in comp_ids):
        raise ValueError("every label completion must give at least one token")
    pairs = [(n, k) for n in range(len(prompts)) for k in range(len(completions))]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out = torch.zeros(len(prompts), len(completions))
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i : i + batch_size]
        seqs = [prompt_ids[n] + comp_ids[k] for n, k in batch]
        inputs, mask = right_pad(seqs, pad)  # [B, T] each
        width = inputs.shape[1]
        logits = model(input_ids=inputs.to(device), attention_mask=mask.to(device)).logits
        # the last T positions are the inputs' (prompt tuning puts virtual tokens in front)
        logp = torch.log_softmax(logits[:, -width:].float(), dim=-1).cpu()  # [B, T, V]
        for row, (n, k) in enumerate(batch):
            start, comp = len(prompt_ids[n]), comp_ids[k]
            # token at position t is predicted by the logits at t-1
            positions = torch.arange(start - 1, start - 1 + len(comp))
            score = logp[row, positions, torch.tensor(comp)].sum().item()
            out[n, k] = score / len(comp) if length_normalise else score
    model.train(was_training)
    return out


def packs_labels(model: Any) -> bool:
    """Whether `label_loglikelihoods` can score `model` with packed rows: a transformers model
    (directly or under a peft adapter that does not prepend virtual tokens) whose attention takes a
    custom 4D mask and whose forward takes position ids and `logits_to_keep`."""
    from transformers import PreTrainedModel

    inner = unwrapped(model)
    peft_config = getattr(model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False) or not isinstance(inner, PreTrainedModel):
        return False
    if getattr(inner.config, "_attn_implementation", None) not in PACKED_ATTENTION:
        return False
    return "position_ids" in inspect.signature(inner.forward).parameters and accepts_logits_to_keep(model)


def _packed_rows(
    prompt_ids: list[list[int]], tail: list[int], tail_label: list[int], tail_offset: list[int], pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, position ids, allowed) for a batch of prompts, each followed by the same `tail`
    (every label's completion but its last token; tail_label: the label of each tail token, from 1;
    tail_offset: its index within its completion). Rows are left-padded so the tail takes the last
    positions of every row. ids and positions are (B, T); allowed (B, T, T) is True where a query
    (row) may attend to a key (column): its own prompt up to itself, and within a completion the
    completion up to itself; a pad position attends to itself alone (a query with no key at all
    would give NaN in some attention kernels)."""
    width = max(len(p) for p in prompt_ids) + len(tail)
    ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)  # (B, T)
    positions = torch.zeros((len(prompt_ids), width), dtype=torch.long)  # (B, T)
    # (B, T): -1 pad, 0 prompt, k + 1 label k
    segment = torch.full((len(prompt_ids), width), -1, dtype=torch.long)
    prompt_end = width - len(tail)
    for row, prompt in enumerate(prompt_ids):
        start = prompt_end - len(prompt)
        ids[row, start:prompt_end] = torch.tensor(prompt, dtype=torch.long)
        positions[row, start:prompt_end] = torch.arange(len(prompt))
        segment[row, start:prompt_end] = 0
        if tail:
            ids[row, prompt_end:] = torch.tensor(tail, dtype=torch.long)
            positions[row, prompt_end:] = len(prompt) + torch.tensor(tail_offset, dtype=torch.long)
            segment[row, prompt_end:] = torch.tensor(tail_label, dtype=torch.long)
    query, key = segment[:, :, None], segment[:, None, :]  # (B, T, 1), (B, 1, T)
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # (T, T)
    allowed = (causal & (query >= 0) & ((key == 0) | (key == query))) | torch.eye(width, dtype=torch.bool)
    return ids, positions, allowed


def _agree(packed: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> bool:
    """Packed and reference scores equal up to the rounding of the model's dtype."""
    if dtype == torch.float32 or dtype == torch.float64:
        return torch.allclose(packed, reference, rtol=1e-4, atol=1e-4)
    return torch.allclose(packed, reference, rtol=2e-2, atol=0.1)


@torch.no_grad()
def _packed_loglikelihoods(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    completions: list[str],
    prompt_ids: list[list[int]],
    comp_ids: list[list[int]],
    batch_size: int,
) -> torch.Tensor | None:
    """[N, K] summed label log-likelihoods from packed rows, or None when the first batch's check
    against the reference path fails (a model whose forward treats the mask or positions otherwise)."""
    inner = unwrapped(model)
    device, dtype = next(model.parameters()).device, inner.dtype
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # the tail: completion k's tokens but its last (a last token is only ever a target)
    tail = [t for comp in comp_ids for t in comp[:-1]]
    tail_label = [k + 1 for k, comp in enumerate(comp_ids) for _ in comp[:-1]]
    tail_offset = [j for comp in comp_ids for j in range(len(comp) - 1)]
    keep = len(tail) + 1  # the prompt's last position, then every tail position
    # which kept position predicts which label token: the prompt's last predicts every first token,
    # tail token j of completion k predicts its token j + 1
    kept, target, label = [], [], []
    start = 1
    for k, comp in enumerate(comp_ids):
        for j, token in enumerate(comp):
            kept.append(0 if j == 0 else start + j - 1)
            target.append(token)
            label.append(k)
        start += len(comp) - 1
    kept_t, target_t, label_t = (torch.tensor(v, device=device) for v in (kept, target, label))
    order = sorted(range(len(prompts)), key=lambda n: -len(prompt_ids[n]))  # less padding per batch
    out = torch.zeros(len(prompts), len(comp_ids))
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        ids, positions, allowed = _packed_rows(
            [prompt_ids[n] for n in rows], tail, tail_label, tail_offset, pad
        )
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask[:, None].to(device),  # (B, 1, T, T)
            position_ids=positions.to(device),
            logits_to_keep=keep,
            use_cache=False,
        ).logits[:, -keep:]  # (B, keep, V)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, keep, V)
        picked = logp[:, kept_t, target_t]  # (B, label tokens)
        scores = torch.zeros(len(rows), len(comp_ids), device=device).index_add_(1, label_t, picked).cpu()
        out[rows] = scores
        if i == 0:  # the row with the most padding, checked against the reference path
            n = rows[-1]
            reference = label_loglikelihoods_reference(
                model, tokenizer, [prompts[n]], completions, batch_size=len(completions)
            )
            if not _agree(out[n : n + 1], reference, dtype):
                return None
    return out


@torch.no_grad()
def label_loglikelihoods(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    completions: list[str],
    batch_size: int = 8,
    length_normalise: bool = False,
) -> torch.Tensor:
    """[N, K] score of completion k after prompt n, every prompt computed once for all K labels
    (`batch_size` prompts per forward); equal to `label_loglikelihoods_reference` up to float
    rounding, which scores models the packed rows cannot serve (`packs_labels`), and every model
    whose first packed batch does not agree with it on the row with the most padding."""
    comp_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    if any(len(c) == 0 for c in comp_ids):
        raise ValueError("every label completion must give at least one token")
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt must give at least one token (its last predicts the label)")
    if not prompts:
        return torch.zeros(0, len(completions))
    scores = None
    if packs_labels(model):
        was_training = model.training
        model.eval()
        try:
            scores = _packed_loglikelihoods(
                model, tokenizer, prompts, completions, prompt_ids, comp_ids, batch_size
            )
        finally:
            model.train(was_training)
    if scores is None:
        return label_loglikelihoods_reference(
            model, tokenizer, prompts, completions, batch_size, length_normalise
        )
    if length_normalise:
        scores = scores / torch.tensor([float(len(c)) for c in comp_ids])
    return scores


@torch.no_grad()
def head_predictions(
    model: torch.nn.Module, tokenizer: Any, prompts: list[str], labels: list[str], batch_size: int = 8
) -> list[int]:
    """Class index per prompt from a sequence classifier: the argmax of its class logits, one
    forward per example (batched, right padding with the model's pad id, by which it finds each
    row's last real token). The head's labels must be `labels`, in order."""
    config = unwrapped(model).config
    head_labels = [config.id2label[i] for i in range(config.num_labels)]
    if head_labels != labels:
        raise ValueError(f"the classification head's labels {head_labels} are not the task's {labels}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    predicted: list[int] = []
    for i in range(0, len(prompt_ids), batch_size):
        inputs, mask = right_pad(prompt_ids[i : i + batch_size], config.pad_token_id)  # [B, T] each
        logits = model(input_ids=inputs.to(device), attention_mask=mask.to(device)).logits  # [B, K]
        predicted += logits.argmax(dim=-1).tolist()
    model.train(was_training)
    return predicted


def classification_metrics(gold: list[str], predicted: list[str], labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall and the confusion matrix (rows gold, columns
    predicted). Written out rather than via scikit-learn to avoid a dependency for ten lines; a
    class with no predicted (or no gold) example gets precision (recall) 0, as sklearn's zero_division=0."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, predicted, strict=True):
        matrix[index[g]][index[p]] += 1
    per_class: dict[str, dict[str, float]] = {}
    for i, label in enumerate(labels):
        tp = matrix[i][i]
        n_pred = sum(row[i] for row in matrix)
        n_gold = sum(matrix[i])
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_gold if n_gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": n_gold}
    return {
        "accuracy": sum(matrix[i][i] for i in range(len(labels))) / max(len(gold), 1),
        "macro_f1": sum(c["f1"] for c in per_class.values()) / len(labels),
        "per_class": per_class,
        "confusion_matrix": matrix,
        "labels": labels,
    }


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.2 * len(labels) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
