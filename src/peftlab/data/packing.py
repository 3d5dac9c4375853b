"""Turn token streams into causal-LM training blocks (input_ids, labels, attention_mask)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # label value that transformers' loss skips


@dataclass
class Blocks:
    """Training blocks plus the counts a report needs."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    attention_mask: list[list[int]]
    real_tokens: int  # tokens that carry a label (not padding)
    pad_tokens: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def padding_waste(self) -> float:
        total = self.real_tokens + self.pad_tokens
        return self.pad_tokens / total if total else 0.0


def group_concatenated(
    docs: Sequence[Sequence[int]], block_size: int, eos_id: int | None, max_tokens: int | None = None
) -> Blocks:
    """The classic recipe: join documents (EOS after each), cut into full blocks, drop the remainder."""
    stream: list[int] = []
    for doc in docs:
        stream.extend(doc)
        if eos_id is not None:
            stream.append(eos_id)
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    if max_tokens is not None:
        stream = stream[:max_tokens]
    n_blocks = len(stream) // block_size
    ids = [stream[i * block_size : (i + 1) * block_size] for i in range(n_blocks)]
    return Blocks(ids, [list(b) for b in ids], [[1] * block_size for _ in ids], n_blocks * block_size, 0)


def group_per_document(
    docs: Sequence[Sequence[int]],
    block_size: int,
    eos_id: int | None,
    pad_id: int,
    max_tokens: int | None = None,
) -> Blocks:
    """Each document cut into its own blocks; the last block of a document is padded (labels masked)."""
    ids_out: list[list[int]] = []
    labels_out: list[list[int]] = []
    mask_out: list[list[int]] = []
    real = pad = 0
    budget = max_tokens if max_tokens is not None else float("inf")
    for doc in docs:
        tokens = list(doc) + ([eos_id] if eos_id is not None else [])
        for start in range(0, len(tokens), block_size):
            if budget <= 0:
                break
            chunk = tokens[start : start + block_size][: int(min(block_size, budget))]
            if len(chunk) < 2:  # a lone token predicts nothing
                continue
            n_pad = block_size - len(chunk)
            ids_out.append(chunk + [pad_id] * n_pad)
            labels_out.append(chunk + [IGNORE_INDEX] * n_pad)
            mask_out.append([1] * len(chunk) + [0] * n_pad)
            real += len(chunk)
            pad += n_pad
            budget -= len(chunk)
    return Blocks(ids_out, labels_out, mask_out, real, pad)


class BlockDataset(torch.utils.data.Dataset):
    """A map-style dataset of equal-length blocks for the Trainer."""

    def __init__(self, blocks: Blocks):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.tensor(self.blocks.input_ids[index]),
            "labels": torch.tensor(self.blocks.labels[index]),
            "attention_mask": torch.tensor(self.blocks.attention_mask[index]),
        }
