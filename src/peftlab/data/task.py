"""build_task_data(cfg.data, tokenizer) -> TaskData: the one entry point from config to training data.

load -> normalise -> sample -> split (by group) -> remove train/test overlap -> tokenise (template,
masks) -> truncate or drop -> pack. The held-out normalised records and the counts travel along for
evaluation and the manifest. Tokenised examples are cached, keyed by data, tokenizer and settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftlab.config import DataConfig
from peftlab.data.formats import normalise
from peftlab.data.lm import build_train_blocks
from peftlab.data.loading import load_raw
from peftlab.data.packing import BlockDataset, PackedBlocks, PackedCollator, PackedDataset, pack_examples
from peftlab.data.splits import remove_overlap, sample, split_by_group
from peftlab.data.templates import Example, tokenize_chat, tokenize_classification
from peftlab.errors import DataError


@dataclass
class TaskData:
    train_dataset: torch.utils.data.Dataset
    collator: Any  # None: the Trainer's default collator
    test_records: list[dict[str, Any]]
    label_names: list[str] | None
    stats: dict[str, Any] = field(default_factory=dict)


def _load_normalised(path: str, cfg: DataConfig, counts: Counter[str]) -> list[dict[str, Any]]:
    raw = load_raw(path, cfg.file_format, cfg.header, cfg.columns)
    fmt = (
        cfg.format if cfg.format != "auto" else ("classification" if cfg.kind == "classification" else "auto")
    )
    kept: list[int] = []
    records = normalise(raw, fmt, cfg.fields, cfg.label_names, cfg.on_error, counts, kept)
    if cfg.group_key is not None:  # carry the group key for the split; removed again afterwards
        key = cfg.fields.get(cfg.group_key, cfg.group_key)
        for rec, index in zip(records, kept, strict=True):
            if key not in raw[index].fields:
                raise DataError(f"{raw[index].where}: missing group field {key!r} (data.group_key)")
            rec["_group"] = str(raw[index].fields[key])
    return records


def _example(rec: dict[str, Any], cfg: DataConfig, tokenizer: Any) -> Example:
    if "messages" in rec:
        return tokenize_chat(rec["messages"], tokenizer, cfg.chat_template, cfg.train_on)
    if "label" in rec:
        return tokenize_classification(rec["text"], rec["label"], tokenizer, cfg.prompt_template)
    ids = tokenizer(rec["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Example(ids, list(ids))


def _cache_path(cfg: DataConfig, tokenizer: Any, records: list[dict[str, Any]]) -> Path:
    h = hashlib.sha256()
    h.update(json.dumps(records, sort_keys=True).encode())
    h.update(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode())
    h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    root = Path(os.environ.get("PEFTLAB_CACHE", Path.home() / ".cache" / "peftlab")) / "data"
    return root / f"{h.hexdigest()[:32]}.json"


def tokenize_all(
    records: list[dict[str, Any]], cfg: DataConfig, tokenizer: Any, counts: Counter[str]
) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per example, over-long ones truncated or dropped (counted); cached as JSON."""
    cache = _cache_path(cfg, tokenizer, records) if cfg.cache else None
    if cache is not None and cache.is_file():
        stored = json.loads(cache.read_text())
        counts.update(stored["counts"])
        counts["cache_hit"] = 1
        return [(e[0], e[1]) for e in stored["examples"]]
    out: list[tuple[list[int], list[int]]] = []
    local: Counter[str] = Counter()
    for rec in records:
        ex = _example(rec, cfg, tokenizer)
        if len(ex.input_ids) > cfg.max_seq_len:
            if cfg.truncation == "drop":
                local["dropped_too_long"] += 1
                continue
            local["truncated"] += 1
            ex = Example(ex.input_ids[: cfg.max_seq_len], ex.labels[: cfg.max_seq_len])
        if all(label < 0 for label in ex.labels[1:]):
            local["dropped_no_loss_tokens"] += 1  # e.g. the reply was cut off entirely
            continue
        out.append((ex.input_ids, ex.labels))
    counts.update(local)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"counts": dict(local), "examples": out}))
        tmp.replace(cache)  # atomic: never a half-written cache file
    return out


def build_task_data(cfg: DataConfig, tokenizer: Any, seed: int = 42) -> TaskData:
    counts: Counter[str] = Counter()
    if (
        cfg.kind == "text"
        and cfg.file_format in {"auto", "text"}
        and not cfg.train_path.endswith((".jsonl", ".json", ".csv", ".tsv", ".parquet"))
    ):
        # raw text files: the language-modelling recipe of data/lm.py (concatenated or per document)
        lm_blocks = build_train_blocks(cfg, tokenizer)
        stats = {
            "kind": "text",
            "train_blocks": len(lm_blocks),
            "train_real_tokens": lm_blocks.real_tokens,
            "padding_waste": lm_blocks.padding_waste,
        }
        return TaskData(BlockDataset(lm_blocks), None, [], None, stats)

    records = _load_normalised(cfg.train_path, cfg, counts)
    counts["loaded_train_records"] = len(records)
    if cfg.test_path is not None:
        test = _load_normalised(cfg.test_path, cfg, counts)
        train = records
    else:
        groups = [r["_group"] for r in records] if cfg.group_key else None
        train, test = split_by_group(records, groups, cfg.test_fraction, seed)
    if cfg.group_key:
        counts["train_groups"] = len({r["_group"] for r in train})
        counts["test_groups"] = len({r["_group"] for r in test})
        for rec in (*train, *test):
            rec.pop("_group", None)
    train = sample(train, cfg.sample, seed)
    test = sample(test, cfg.test_sample, seed + 1)
    if cfg.dedupe and test:
        train = remove_overlap(train, test, counts)

    label_names = cfg.label_names
    if cfg.kind == "classification" and label_names is None:
        label_names = sorted({r["label"] for r in (*train, *test)})
    examples = tokenize_all(train, cfg, tokenizer, counts)
    if not examples:
        raise DataError(
            f"{cfg.train_path}: no training example is left after splitting, dedupe and length limits"
        )
    blocks: PackedBlocks = pack_examples(examples, cfg.max_seq_len, cfg.packing)
    stats = {
        "kind": cfg.kind,
        "train_records": len(train),
        "test_records": len(test),
        "train_examples": len(examples),
        "train_blocks": len(blocks),
        "train_real_tokens": blocks.real_tokens,
        "train_loss_tokens": sum(sum(1 for x in lab if x >= 0) for lab in blocks.labels),
        "padding_waste": blocks.padding_waste,
        "packing": cfg.packing,
        "label_names": label_names,
        **dict(counts),
    }
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TaskData(PackedDataset(blocks), PackedCollator(pad_id), test, label_names, stats)
