"""build_task_data(cfg.data, tokenizer) -> TaskData: the one entry point from config to training data.

load -> normalise -> split test (by group) -> sample -> split validation (by group) -> remove overlap
(train vs validation and test, validation vs test) -> tokenise (template, masks) -> truncate or drop
-> pack. The validation set is tokenised and packed like train (it gives the in-training eval_loss);
the held-out normalised test records and the counts travel along for evaluation and the manifest.
Raw text takes its validation blocks from data.validation_path, else from the end of the training
blocks. Tokenised examples are cached, keyed by data, tokenizer and settings. For a method whose spec
has a classification head, classification records become (prompt ids, class index) rows instead
(data/class_rows.py: one example a row, right-padded, not cached).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftlab.cache import cache_dir
from peftlab.config.sections import DataConfig
from peftlab.data.class_rows import ClassCollator, ClassDataset, padding_bound, tokenize_classes
from peftlab.data.formats import detect_format, normalise
from peftlab.data.lm import build_blocks, build_train_blocks
from peftlab.data.loading import RawRecord, load_raw
from peftlab.data.packing import BlockDataset, PackedBlocks, PackedCollator, PackedDataset, pack_examples
from peftlab.data.splits import remove_overlap, sample, split_by_group
from peftlab.data.templates import Example, tokenize_chat, tokenize_classification
from peftlab.data.text import skipped_files
from peftlab.errors import DataError


@dataclass
class TaskData:
    train_dataset: torch.utils.data.Dataset
    collator: Any  # None: the Trainer's default collator
    test_records: list[dict[str, Any]]
    label_names: list[str] | None
    stats: dict[str, Any] = field(default_factory=dict)
    validation_dataset: torch.utils.data.Dataset | None = None  # None: no in-training evaluation


def _load_normalised(path: str, cfg: DataConfig, counts: Counter[str]) -> list[dict[str, Any]]:
    raw = load_raw(path, cfg.file_format, cfg.header, cfg.columns)
    fmt: str = (
        cfg.format if cfg.format != "auto" else ("classification" if cfg.kind == "classification" else "auto")
    )
    if fmt == "auto" and raw:
        try:
            fmt = detect_format(raw[0].fields, cfg.fields)
        except DataError as exc:
            raise DataError(f"{raw[0].where}: {exc}") from None
    _check_format_fits_kind(fmt, cfg, raw)
    kept: list[int] = []
    records = normalise(raw, fmt, cfg.fields, cfg.label_names, cfg.on_error, counts, kept)
    if cfg.group_key is not None:  # carry the group key for the split; removed again afterwards
        key = cfg.fields.get(cfg.group_key, cfg.group_key)
        for rec, index in zip(records, kept, strict=True):
            if key not in raw[index].fields:
                raise DataError(f"{raw[index].where}: missing group field {key!r} (data.group_key)")
            rec["_group"] = str(raw[index].fields[key])
    return records


CHAT_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")


def _check_format_fits_kind(fmt: str, cfg: DataConfig, raw: list[RawRecord]) -> None:
    """Chat data must give conversations and classification data (text, label) records: otherwise
    the run would train on something else than data.kind says, and evaluate it as data.kind."""
    if cfg.kind == "text" or fmt == "auto":  # auto: no records (normalise says so)
        return
    wanted = CHAT_FORMATS if cfg.kind == "chat" else ("classification",)
    if fmt in wanted:
        return
    needs = (
        "conversations (fields messages, conversations, instruction + output, or prompt + completion)"
        if cfg.kind == "chat"
        else "records with a text and a label"
    )
    kind = "chat" if fmt in CHAT_FORMATS else fmt
    if cfg.format != "auto":
        raise DataError(
            f"data.kind={cfg.kind} needs {needs}, but data.format={fmt} gives {kind} records; "
            f"set data.format={wanted[0] if len(wanted) == 1 else 'auto'}, or data.kind={kind}"
        )
    raise DataError(
        f"{raw[0].where}: data.kind={cfg.kind} needs {needs}, but this record has fields "
        f"{sorted(raw[0].fields)}; map field names with data.fields, or set data.kind={kind}"
    )


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
    return cache_dir() / "data" / f"{h.hexdigest()[:32]}.json"


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


def _text_task(cfg: DataConfig, tokenizer: Any) -> TaskData:
    """Raw text files: the language-modelling recipe of data/lm.py (concatenated or per document)."""
    blocks = build_train_blocks(cfg, tokenizer)
    validation = None
    if cfg.validation_path is not None:
        validation = build_blocks(cfg.validation_path, cfg, tokenizer)
        source = f"data.validation_path ({len(validation)} blocks)"
    elif cfg.validation_fraction > 0 and len(blocks) >= 2:
        n = max(1, round(len(blocks) * cfg.validation_fraction))
        blocks, validation = blocks.split_last(n)
        source = f"the last {n} of {len(blocks) + n} training blocks (data.validation_fraction={cfg.validation_fraction})"
    else:
        source = "none"
    stats = {
        "kind": "text",
        "train_blocks": len(blocks),
        "train_real_tokens": blocks.real_tokens,
        "padding_waste": blocks.padding_waste,
        "validation_source": source,
        "validation_blocks": len(validation) if validation is not None else 0,
        "validation_real_tokens": validation.real_tokens if validation is not None else 0,
        **_skipped(cfg),
    }
    return TaskData(
        BlockDataset(blocks), None, [], None, stats, BlockDataset(validation) if validation else None
    )


def _split(
    records: list[dict[str, Any]], cfg: DataConfig, seed: int, counts: Counter[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], str]:
    """train, validation, test and where validation came from; no group straddles any two of them."""

    def groups(part: list[dict[str, Any]]) -> list[str] | None:
        return [r["_group"] for r in part] if cfg.group_key else None

    if cfg.test_path is not None:
        test = _load_normalised(cfg.test_path, cfg, counts)
        train = records
    else:
        train, test = split_by_group(records, groups(records), cfg.test_fraction, seed)
    train = sample(train, cfg.sample, seed)
    test = sample(test, cfg.test_sample, seed + 1)
    validation: list[dict[str, Any]] = []
    source = "none"
    if cfg.validation_path is not None:
        validation = _load_normalised(cfg.validation_path, cfg, counts)
        source = "data.validation_path"
    elif cfg.validation_fraction > 0:
        train, validation = split_by_group(
            train, groups(train), cfg.validation_fraction, seed + 2, at_least_one=True
        )
        unit = f"groups ({cfg.group_key})" if cfg.group_key else "records"
        source = f"{cfg.validation_fraction} of the train {unit} (data.validation_fraction)"
    if cfg.group_key:
        for name, part in (("train", train), ("validation", validation), ("test", test)):
            counts[f"{name}_groups"] = len({r["_group"] for r in part})
        for rec in (*train, *validation, *test):
            rec.pop("_group", None)
    if cfg.dedupe and validation and test:
        validation = remove_overlap(validation, test, counts, prefix="validation_")
    if cfg.dedupe and (test or validation):
        train = remove_overlap(train, [*test, *validation], counts)
    return train, validation, test, source


def require_examples(cfg: DataConfig, examples: list[Any]) -> None:
    if not examples:
        raise DataError(
            f"{cfg.train_path}: no training example is left after splitting, dedupe and length limits"
        )


def split_counts(
    cfg: DataConfig, parts: tuple[list[Any], list[Any], list[Any]], source: str
) -> dict[str, Any]:
    """The manifest's record counts of the train / validation / test split."""
    train, validation, test = parts
    return {
        "kind": cfg.kind,
        "train_records": len(train),
        "validation_records": len(validation),
        "test_records": len(test),
        "validation_source": source,
        **_skipped(cfg),
    }


def _skipped(cfg: DataConfig) -> dict[str, Any]:
    """The files of a train_path folder that were skipped as not data (README, hidden files), if any."""
    names = skipped_files(cfg.train_path)
    return {"skipped_files": names} if names else {}


def _class_task(
    cfg: DataConfig,
    tokenizer: Any,
    parts: tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]],
    label_names: list[str],
    counts: Counter[str],
    source: str,
) -> TaskData:
    """(prompt ids, class index) rows for a sequence-classification head (data/class_rows.py)."""
    train, validation, test = parts
    examples = tokenize_classes(train, label_names, cfg, tokenizer, counts)
    require_examples(cfg, examples)
    val_counts: Counter[str] = Counter()
    val_examples = tokenize_classes(validation, label_names, cfg, tokenizer, val_counts)
    stats = {
        **split_counts(cfg, parts, source),
        "head": "sequence_classification",
        "train_examples": len(examples),
        "validation_examples": len(val_examples),
        "train_blocks": len(examples),  # one example a row: never packed
        "validation_blocks": len(val_examples),
        "train_real_tokens": sum(len(ids) for ids, _ in examples),
        "padding_waste_bound": padding_bound(examples),
        "packing": False,
        "label_names": label_names,
        **dict(counts),
        **{f"validation_{k}": v for k, v in val_counts.items()},
    }
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    validation_set = ClassDataset(val_examples) if val_examples else None
    return TaskData(ClassDataset(examples), ClassCollator(pad_id), test, label_names, stats, validation_set)


def build_task_data(cfg: DataConfig, tokenizer: Any, seed: int = 42, head: str = "causal_lm") -> TaskData:
    """`head`: the MethodSpec's head; sequence_classification gives (prompt, class index) rows."""
    if (
        cfg.kind == "text"
        and cfg.file_format in {"auto", "text"}
        and not cfg.train_path.endswith((".jsonl", ".json", ".csv", ".tsv", ".parquet"))
    ):
        return _text_task(cfg, tokenizer)

    counts: Counter[str] = Counter()
    records = _load_normalised(cfg.train_path, cfg, counts)
    counts["loaded_train_records"] = len(records)
    train, validation, test, source = _split(records, cfg, seed, counts)

    label_names = cfg.label_names
    if cfg.kind == "classification" and label_names is None:
        label_names = sorted({r["label"] for r in (*train, *validation, *test)})
    if head == "sequence_classification" and label_names is not None:
        return _class_task(cfg, tokenizer, (train, validation, test), label_names, counts, source)
    examples = tokenize_all(train, cfg, tokenizer, counts)
    require_examples(cfg, examples)
    blocks: PackedBlocks = pack_examples(examples, cfg.max_seq_len, cfg.packing)
    val_counts: Counter[str] = Counter()
    val_examples = tokenize_all(validation, cfg, tokenizer, val_counts) if validation else []
    val_blocks = pack_examples(val_examples, cfg.max_seq_len, cfg.packing) if val_examples else None
    stats = {
        **split_counts(cfg, (train, validation, test), source),
        "train_examples": len(examples),
        "validation_examples": len(val_examples),
        "train_blocks": len(blocks),
        "validation_blocks": len(val_blocks) if val_blocks is not None else 0,
        "train_real_tokens": blocks.real_tokens,
        "train_loss_tokens": sum(sum(1 for x in lab if x >= 0) for lab in blocks.labels),
        # rows padded to max_seq_len (packing) or to the longest row: an upper bound; the collator pads
        # to the longest row of each batch, and metrics.json has the waste of the batches trained on
        "padding_waste_bound": blocks.padding_waste,
        "packing": cfg.packing,
        "label_names": label_names,
        **dict(counts),
        **{f"validation_{k}": v for k, v in val_counts.items() if k != "cache_hit"},
    }
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TaskData(
        PackedDataset(blocks),
        PackedCollator(pad_id),
        test,
        label_names,
        stats,
        PackedDataset(val_blocks) if val_blocks is not None else None,
    )
