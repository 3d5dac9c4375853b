"""Classification by label log-likelihood (any causal LM, no new head) or by a trained head.

For a causal LM the score of a label is the sum of the log-probabilities of the label's completion
tokens given the prompt (optionally divided by their count); the prediction is the best label. A
sequence classifier (methods/classification_head.py) predicts the argmax of its class logits.
Both feed the same `classification_metrics`. Prompts and completions come from the caller (the
data layer builds prompts).
"""

from __future__ import annotations

from typing import Any

import torch

from peftlab.data.class_rows import right_pad


@torch.no_grad()
def label_loglikelihoods(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    completions: list[str],
    batch_size: int = 8,
    length_normalise: bool = False,
) -> torch.Tensor:
    """[N, K] score of completion k after prompt n. Prompt and completion are tokenised apart so
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


@torch.no_grad()
def head_predictions(
    model: torch.nn.Module, tokenizer: Any, prompts: list[str], labels: list[str], batch_size: int = 8
) -> list[int]:
    """Class index per prompt from a sequence classifier: the argmax of its class logits, one
    forward per example (batched, right padding with the model's pad id, by which it finds each
    row's last real token). The head's labels must be `labels`, in order."""
    from peftlab.model.structure import unwrapped

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
