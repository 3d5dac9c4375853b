"""Turn token streams into causal-LM training blocks (input_ids, labels, attention_mask)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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

    def split_last(self, n: int) -> tuple[Blocks, Blocks]:
        """(all but the last n blocks, the last n blocks); counts recomputed from the masks."""

        def part(rows: slice) -> Blocks:
            mask = self.attention_mask[rows]
            real = sum(sum(m) for m in mask)
            pad = sum(len(m) for m in mask) - real
            return Blocks(self.input_ids[rows], self.labels[rows], mask, real, pad)

        cut = len(self) - n
        return part(slice(0, cut)), part(slice(cut, None))


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


# --- packing of variable-length examples (chat, classification) ---------------------------------


@dataclass
class PackedBlocks:
    """Rows of one or more whole examples; position ids restart at 0 at each example."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    position_ids: list[list[int]]
    real_tokens: int
    row_length: int  # the length rows are padded to (max_seq_len when packed)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def pad_tokens(self) -> int:
        return len(self) * self.row_length - self.real_tokens

    @property
    def padding_waste(self) -> float:
        total = len(self) * self.row_length
        return self.pad_tokens / total if total else 0.0


def pack_examples(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]], max_seq_len: int, packing: bool
) -> PackedBlocks:
    """Greedy in-order packing: append an example to the current row while it fits.

    The first label of every example is masked: in a packed row it would be predicted from the end
    of the previous example, which an example alone never sees. Without packing, one example a row.
    """
    rows: list[tuple[list[int], list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex_ids, ex_labels in examples:
        if ids and (not packing or len(ids) + len(ex_ids) > max_seq_len):
            rows.append((ids, labels, positions))
            ids, labels, positions = [], [], []
        ids.extend(ex_ids)
        labels.extend([IGNORE_INDEX, *ex_labels[1:]])
        positions.extend(range(len(ex_ids)))
    if ids:
        rows.append((ids, labels, positions))
    real = sum(len(r[0]) for r in rows)
    row_length = max_seq_len if packing else max((len(r[0]) for r in rows), default=0)
    return PackedBlocks([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], real, row_length)


def block_diagonal_causal_mask(
    position_ids: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(B, L) position ids -> (B, 1, L, L) additive mask: causal, and no attention across examples.

    An example starts wherever the position id does not follow on from its left neighbour.
    """
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    segment = starts.cumsum(-1)  # (B, L) example index per token
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = causal[None] & (segment[:, :, None] == segment[:, None, :])  # (B, L, L)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class PackedDataset(torch.utils.data.Dataset):
    def __init__(self, blocks: PackedBlocks):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        b = self.blocks
        return {
            "input_ids": b.input_ids[index],
            "labels": b.labels[index],
            "position_ids": b.position_ids[index],
        }


class PackedCollator:
    """Pads rows to the longest in the batch (padding is its own segment, labels masked).

    No attention_mask is passed: transformers then reads example boundaries from the restarting
    position ids and builds the block-diagonal causal mask itself (sdpa/eager on the CPU), and flash
    attention on CUDA runs the padding-free varlen path from the same position ids. The explicit
    4D mask (block_diagonal_causal_mask) is kept for models that do not, and the tests compare both.
    """

    def __init__(self, pad_id: int, explicit_mask: bool = False, tally_key: str | None = None):
        self.pad_id = pad_id
        self.explicit_mask = explicit_mask
        # When set, each batch carries (real tokens, pad tokens) under this key for padding.PaddingTally
        # (a forward pre-hook that removes it before the model sees it).
        self.tally_key = tally_key

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        length = max(len(r["input_ids"]) for r in rows)
        ids, labels, positions = [], [], []
        for r in rows:
            n_pad = length - len(r["input_ids"])
            ids.append(r["input_ids"] + [self.pad_id] * n_pad)
            labels.append(r["labels"] + [IGNORE_INDEX] * n_pad)
            positions.append(r["position_ids"] + list(range(n_pad)))
        batch = {
            "input_ids": torch.tensor(ids),  # (B, L)
            "labels": torch.tensor(labels),  # (B, L)
            "position_ids": torch.tensor(positions),  # (B, L)
        }
        # transformers only reads packed boundaries from position ids when no KV cache is built
        batch["use_cache"] = False  # type: ignore[assignment]
        if self.explicit_mask:
            batch["attention_mask"] = block_diagonal_causal_mask(batch["position_ids"])  # (B, 1, L, L)
        if self.tally_key is not None:
            real = sum(len(r["input_ids"]) for r in rows)
            batch[self.tally_key] = (real, len(rows) * length - real)  # type: ignore[assignment]
        return batch
