"""Raw text sources (a file or a folder of files) cut into documents."""

from __future__ import annotations

import re
from pathlib import Path

from peftlab.errors import DataError

TEXT_SUFFIXES = {".txt", ".raw", ".text", ".md", ""}
# wikitext marks an article by a top-level heading line " = Title = " (sub-headings use " = = ").
WIKITEXT_HEADING = re.compile(r"^ = [^=].* = $")


# Files in a data folder that are about the data, not data: hidden files (.DS_Store, ._* AppleDouble,
# .gitignore) and these names, whatever their suffix (README, README.md, LICENSE.txt, SOURCE.txt, ...).
NOT_DATA_STEMS = {
    "readme",
    "license",
    "licence",
    "copying",
    "notice",
    "authors",
    "contributors",
    "changelog",
    "changes",
    "citation",
    "source",
}


# ... and README_de, LICENSE-MIT, DATA_LICENSE and the like
NOT_DATA_AFFIXED = re.compile(r"^(?:[a-z0-9]+[_-])?(?:readme|licen[cs]e)(?:[_-][a-z0-9]+)?$")


def is_data_file(file: Path) -> bool:
    """A text file of a data folder that holds data (see NOT_DATA_STEMS)."""
    stem = file.stem.lower()
    if file.name.startswith(".") or stem in NOT_DATA_STEMS or NOT_DATA_AFFIXED.match(stem):
        return False
    return file.suffix in TEXT_SUFFIXES


def folder_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """The text files of a folder that are read (sorted, for reproducibility) and the files that are
    skipped as not data (hidden files, README, LICENSE, ...; sorted); other suffixes are not listed."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    read = [p for p in files if is_data_file(p)]
    skipped = [
        p for p in files if not is_data_file(p) and (p.name.startswith(".") or p.suffix in TEXT_SUFFIXES)
    ]
    return read, skipped


def skipped_files(path: str | Path) -> list[str]:
    """Names of the files a data folder holds that read_text_files skips as not data ([] for a file)."""
    path = Path(path).expanduser()
    return [p.name for p in folder_files(path)[1]] if path.is_dir() else []


def read_text_files(path: str | Path) -> list[tuple[str, str]]:
    """(file name, text) for a file, or for every data text file in a folder (sorted, for
    reproducibility; hidden files and README-like files are skipped: folder_files)."""
    path = Path(path).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files, skipped = folder_files(path)
        if not files:
            also = f"; skipped as not data: {', '.join(p.name for p in skipped)}" if skipped else ""
            raise DataError(
                f"folder {path} has no text files "
                f"({', '.join(sorted(s or 'no suffix' for s in TEXT_SUFFIXES))}){also}"
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
