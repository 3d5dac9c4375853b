"""Seeded sampling, group-aware train/validation/test splits, and overlap removal between them."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from typing import Any


def sample(records: list[Any], n_or_fraction: float | None, seed: int) -> list[Any]:
    """n records (n >= 1) or a fraction (< 1), drawn with a seeded RNG, original order kept."""
    if n_or_fraction is None:
        return records
    n = int(n_or_fraction) if n_or_fraction >= 1 else round(len(records) * n_or_fraction)
    if n >= len(records):
        return records
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]


def split_by_group(
    records: list[Any],
    groups: list[str] | None,
    test_fraction: float,
    seed: int,
    at_least_one: bool = False,
) -> tuple[list[Any], list[Any]]:
    """Kept and held-out parts; with groups, whole groups go to one side (records of a conversation
    never straddle). at_least_one: a fraction > 0 holds out one group even when it rounds to none,
    as long as one group is left to keep."""
    keys = groups if groups is not None else [str(i) for i in range(len(records))]
    unique = sorted(set(keys))
    random.Random(seed).shuffle(unique)
    n_test = round(len(unique) * test_fraction)
    if at_least_one and test_fraction > 0 and n_test == 0 and len(unique) >= 2:
        n_test = 1
    test_keys = set(unique[:n_test])
    train = [r for r, k in zip(records, keys, strict=True) if k not in test_keys]
    test = [r for r, k in zip(records, keys, strict=True) if k in test_keys]
    return train, test


def _normalise(value: Any) -> Any:
    if isinstance(value, str):
        return re.sub(r"\s+", " ", value).strip().casefold()
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    return value


def record_key(record: dict[str, Any], normalised: bool) -> str:
    """The comparable content of a record; normalised: whitespace collapsed, case folded."""
    return json.dumps(_normalise(record) if normalised else record, sort_keys=True, ensure_ascii=False)


def remove_overlap(
    train: list[dict[str, Any]], test: list[dict[str, Any]], counts: Counter[str], prefix: str = ""
) -> list[dict[str, Any]]:
    """Train without any record that also occurs in test, exactly or after normalisation (counted
    as `<prefix>overlap_removed_exact` and `<prefix>overlap_removed_normalised`).

    Classification records compare on their text only (the same sentence with another label is still
    a leak); chat records compare on the whole conversation.
    """

    def content(rec: dict[str, Any]) -> dict[str, Any]:
        return {"text": rec["text"]} if "label" in rec else rec

    exact_key, loose_key = f"{prefix}overlap_removed_exact", f"{prefix}overlap_removed_normalised"
    counts.update({exact_key: 0, loose_key: 0})
    exact = {record_key(content(r), False) for r in test}
    loose = {record_key(content(r), True) for r in test}
    kept = []
    for rec in train:
        if record_key(content(rec), False) in exact:
            counts[exact_key] += 1
        elif record_key(content(rec), True) in loose:
            counts[loose_key] += 1
        else:
            kept.append(rec)
    return kept
