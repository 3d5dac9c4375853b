"""Classification rows for a sequence-classification head: (prompt token ids, class index).

The prompt is the one the causal recipe trains on (templates.build_classification_prompt), without
the label completion: the head reads the hidden state of the prompt's last real token. Rows are never
packed (a packed row would have one last token for several examples); a batch is right-padded to its
longest row with an attention mask, and its labels are a LongTensor [B] of class indices.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from peftlab.config.sections import DataConfig
from peftlab.data.templates import build_classification_prompt
from peftlab.errors import DataError

ClassExample = tuple[list[int], int]  # prompt ids, class index


def tokenize_classes(
    records: list[dict[str, Any]],
    label_names: list[str],
    cfg: DataConfig,
    tokenizer: Any,
    counts: Counter[str],
) -> list[ClassExample]:
    """Prompt ids and class index per record; over-long prompts truncated (as the causal recipe cuts
    its rows) or dropped, and counted. Not cached: one tokenizer call over the prompts is cheap."""
    index = {name: i for i, name in enumerate(label_names)}
    outside = sorted({r["label"] for r in records} - set(index))
    if outside:
        raise DataError(f"labels {outside} are not in the label set {label_names} (data.label_names)")
    prompts = [build_classification_prompt(r["text"], cfg.prompt_template) for r in records]
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    out: list[ClassExample] = []
    for rec, ids in zip(records, encoded, strict=True):
        if len(ids) > cfg.max_seq_len:
            if cfg.truncation == "drop":
                counts["dropped_too_long"] += 1
                continue
            counts["truncated"] += 1
            ids = ids[: cfg.max_seq_len]
        if ids:
            out.append((list(ids), index[rec["label"]]))
        else:
            counts["dropped_empty_prompt"] += 1
    return out


def padding_bound(examples: list[ClassExample]) -> float:
    """Pad share if every row were padded to the longest row (batches pad to their own longest)."""
    if not examples:
        return 0.0
    longest = max(len(ids) for ids, _ in examples)
    real = sum(len(ids) for ids, _ in examples)
    return 1 - real / (longest * len(examples))


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (B, T): rows padded on the right to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


class ClassDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[ClassExample]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids, label = self.examples[index]
        return {"input_ids": ids, "labels": label}


class ClassCollator:
    """Right-pads rows to the longest in the batch; labels [B] class indices.

    `tally_key`, as in packing.PackedCollator: when set, the batch carries (real tokens, pad tokens)
    under that key for padding.PaddingTally."""

    def __init__(self, pad_id: int, tally_key: str | None = None):
        self.pad_id = pad_id
        self.tally_key = tally_key

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        ids, mask = right_pad([r["input_ids"] for r in rows], self.pad_id)  # (B, L) each
        batch: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.tensor([r["labels"] for r in rows], dtype=torch.long),  # (B,)
        }
        if self.tally_key is not None:
            real = int(mask.sum())
            batch[self.tally_key] = (real, mask.numel() - real)
        return batch
