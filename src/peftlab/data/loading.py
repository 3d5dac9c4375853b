"""Load raw records from a source: a hub data set name, or local jsonl/json/csv/tsv/parquet/raw text.

Every record is a plain dict; `where` says which file and line it came from, so that a bad record
can be named in a one-line error.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.data.text import TEXT_SUFFIXES, read_text_files
from peftlab.errors import DataError

TABULAR = {".csv": ",", ".tsv": "\t"}


@dataclass
class RawRecord:
    fields: dict[str, Any]
    where: str  # "file:line" for messages


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not valid UTF-8 (byte offset {exc.start})") from None


def _lines(text: str) -> list[str]:
    """Lines as a text-mode file reads them (\n, \r\n or \r): str.splitlines would also cut at
    U+2028, form feeds and other separators a JSON string or a cell may hold."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _jsonl(path: Path) -> list[RawRecord]:
    out = []
    for number, line in enumerate(_lines(_read_text(path)), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}: line {number} is a JSON {type(value).__name__}, expected an object")
        out.append(RawRecord(value, f"{path}: line {number}"))
    return out


def _json(path: Path) -> list[RawRecord]:
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno} is not valid JSON ({exc.msg})") from None
    if isinstance(value, dict):  # {"data": [...]} or {"train": [...]} style: take the one list inside
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON array of records (or an object holding one array)")
        value = lists[0]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON array of records, got a {type(value).__name__}")
    out = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(f"{path}: record {index} is a JSON {type(item).__name__}, expected an object")
        out.append(RawRecord(item, f"{path}: record {index}"))
    return out


def _csv_rows(path: Path, delimiter: str) -> list[tuple[int, list[str]]]:
    """(line number, cells) of every non-empty line; quotes are plain characters (QUOTE_NONE)."""
    reader = csv.reader(_lines(_read_text(path)), delimiter=delimiter, quoting=csv.QUOTE_NONE)
    rows = []
    try:
        for row in reader:
            if row:
                rows.append((reader.line_num, row))
    except csv.Error as exc:
        # the csv module refuses cells over its process-wide field limit; raising that limit would
        # change it for every other reader in the process, so the cell is refused instead
        line = reader.line_num
        if "field larger than field limit" in str(exc):
            raise DataError(
                f"{path}: line {line} has a cell longer than {csv.field_size_limit():,} characters "
                "(the csv reader's limit); shorten it or store the data as jsonl"
            ) from None
        raise DataError(
            f"{path}: line {line} cannot be read as {delimiter!r}-separated cells ({exc})"
        ) from None
    return rows


def _tabular(path: Path, delimiter: str, header: bool | None, columns: list[str] | None) -> list[RawRecord]:
    rows = _csv_rows(path, delimiter)
    if not rows:
        return []
    first = rows[0][1]
    if header is None:  # a header row has no purely numeric cell, and its last cell differs in kind
        header = not any(cell.strip().lstrip("-").isdigit() for cell in first) and columns is None
    names = (
        first
        if header
        else (columns or ["text", "label"][: len(first)] + [f"col{i}" for i in range(2, len(first))])
    )
    out = []
    for line, row in rows[1:] if header else rows:
        if len(row) != len(names):
            raise DataError(
                f"{path}: line {line} has {len(row)} fields, expected {len(names)} ({', '.join(names)})"
            )
        out.append(RawRecord(dict(zip(names, row, strict=True)), f"{path}: line {line}"))
    return out


def _parquet(path: Path) -> list[RawRecord]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return [RawRecord(row, f"{path}: row {i}") for i, row in enumerate(table.to_pylist())]


def _hub(name: str, split: str) -> list[RawRecord]:
    try:
        import datasets

        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # the hub raises many kinds (offline, not found, gated)
        raise DataError(
            f"cannot load hub data set {name!r} split {split!r}: {str(exc).splitlines()[0]}"
        ) from None
    return [RawRecord(dict(row), f"{name}[{split}]:row {i}") for i, row in enumerate(dataset)]


def load_raw(
    source: str,
    file_format: str = "auto",
    header: bool | None = None,
    columns: list[str] | None = None,
    hub_split: str = "train",
) -> list[RawRecord]:
    """Records from a local file/folder (format from the suffix unless named) or a hub data set name."""
    path = Path(source).expanduser()
    if not path.exists():
        if file_format == "hub" or ("/" in source and not source.startswith((".", "/", "~"))):
            return _hub(source, hub_split)
        raise DataError(f"data file or folder not found: {path} (relative paths start at {Path.cwd()})")
    fmt = file_format if file_format != "auto" else path.suffix.lower().lstrip(".")
    if path.is_dir() or fmt in {"txt", "raw", "text", "md", ""} or f".{fmt}" in TEXT_SUFFIXES:
        return [RawRecord({"text": text}, name) for name, text in read_text_files(path)]
    if fmt == "jsonl":
        return _jsonl(path)
    if fmt == "json":
        return _json(path)
    if fmt in {"csv", "tsv"}:
        return _tabular(path, TABULAR[f".{fmt}"], header, columns)
    if fmt == "parquet":
        return _parquet(path)
    raise DataError(f"{path}: unknown data format {fmt!r} (use jsonl, json, csv, tsv, parquet or text)")
