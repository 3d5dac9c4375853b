"""Raw text sources (a file or a folder of files) cut into documents."""

from __future__ import annotations

import re
from pathlib import Path

from peftlab.errors import DataError

TEXT_SUFFIXES = {".txt", ".raw", ".text", ".md", ""}
# wikitext marks an article by a top-level heading line " = Title = " (sub-headings use " = = ").
WIKITEXT_HEADING = re.compile(r"^ = [^=].* = $")


def read_text_files(path: str | Path) -> list[tuple[str, str]]:
    """(file name, text) for a file, or for every text file in a folder (sorted, for reproducibility)."""
    path = Path(path).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES and p.name != "SOURCE.txt"
        )
        if not files:
            raise DataError(
                f"folder {path} has no text files ({', '.join(sorted(s or 'no suffix' for s in TEXT_SUFFIXES))})"
            )
    else:
        raise DataError(f"data file or folder not found: {path} (relative paths start at {Path.cwd()})")
    out = []
    for file in files:
        try:
            out.append((str(file), file.read_text(encoding="utf-8")))
        except UnicodeDecodeError as exc:
            line = file.read_bytes()[: exc.start].count(b"\n") + 1
            raise DataError(f"{file}: line {line} is not valid UTF-8 (byte offset {exc.start})") from None
    return out


def split_documents(text: str, mode: str) -> list[str]:
    """Cut one file's text into documents; empty documents are dropped."""
    docs: list[str] = []
    if mode == "file":
        docs = [text]
    elif mode == "blank_lines":
        docs = re.split(r"\n\s*\n", text)
    elif mode == "wikitext_headings":
        current: list[str] = []
        for line in text.splitlines(keepends=True):
            if WIKITEXT_HEADING.match(line.rstrip("\n")) and any(s.strip() for s in current):
                docs.append("".join(current))
                current = []
            current.append(line)
        docs.append("".join(current))
    else:
        raise ValueError(f"unknown document split {mode!r}")
    return [d for d in docs if d.strip()]


def load_documents(path: str | Path, mode: str) -> list[str]:
    docs = [doc for _, text in read_text_files(path) for doc in split_documents(text, mode)]
    if not docs:
        raise DataError(f"{path} holds no text")
    return docs
