"""What a model is, by content: the identity the base-evaluation cache keys on and the manifest records.

- A local folder: sha256 over its weight files (`*.safetensors` and their index; `*.bin`/`*.pt` in a
  folder with no safetensors, the allow_pickle case), each by name and content hash, plus
  config.json, the tokenizer and generation files, and peftlab_source.json (a converted GGUF: the
  GGUF's own sha256). Weights changed in place with the same shapes give a new fingerprint.
- A hub id: the commit its revision resolves to in the local hub cache (no network); when it cannot
  be resolved, `hub:<id>@<revision or 'unresolved'>`, an identity that can move (`is_pinned`).
- A single file (a config.json for estimates): its bytes.

A weight file's content hash is remembered in cache_dir()/fingerprints/, one small JSON per file path,
with the file's (size, mtime, ctime, inode, device): an unchanged file is read once (a 7B checkpoint at
disk speed the first time, nothing later); any change of those means it is hashed again. A file
modified within the last RACY_NS is hashed but not remembered: a write in the same clock tick could
leave its mtime as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from peftlab.cache import cache_dir
from peftlab.model.loading import ModelSource
from peftlab.model.loading import file_sha256 as content_sha256  # one hashing loop for weights and GGUFs

RACY_NS = 2_000_000_000  # coarser than any filesystem's timestamp granularity (FAT: 2 s)
# Files beside the weights that change what the model computes or how its output is read.
META_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
GGUF_RECORD = "peftlab_source.json"  # written by loading.converted_gguf_folder
_PINNED = re.compile(r"hub:[^@]+@[0-9a-f]{40}(:.*)?")


def _stat_key(stat: os.stat_result) -> dict[str, int]:
    return {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ctime_ns": stat.st_ctime_ns,
        "inode": stat.st_ino,
        "device": stat.st_dev,
    }


def _memo_path(resolved: Path) -> Path:
    name = hashlib.sha256(str(resolved).encode()).hexdigest()[:32]
    return cache_dir() / "fingerprints" / f"{name}.json"


def _write_atomically(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def file_hash(path: Path) -> str:
    """The content hash of a file, read from the memo when the file is unchanged since it was hashed."""
    resolved = path.resolve()
    key = _stat_key(resolved.stat())
    memo = _memo_path(resolved)
    try:
        record = json.loads(memo.read_text(encoding="utf-8"))
        if record.get("path") == str(resolved) and record.get("stat") == key:
            return str(record["sha256"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass  # no memo, or a damaged one: hash again
    started = time.time_ns()
    sha = content_sha256(resolved)
    settled = key["mtime_ns"] < started - RACY_NS
    if settled and _stat_key(resolved.stat()) == key:  # not written to while it was read
        with contextlib.suppress(OSError):  # a read-only cache only costs a re-read next time
            _write_atomically(memo, {"path": str(resolved), "stat": key, "sha256": sha})
    return sha


def weight_files(folder: Path) -> list[Path]:
    """The files from_pretrained reads weights from: safetensors (and their index), else pickles."""
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.safetensors.index.json"))
    if not any(folder.glob("*.safetensors")):
        for pattern in ("*.bin", "*.pt", "*.bin.index.json", "*.pt.index.json"):
            files += sorted(folder.glob(pattern))
    return sorted(set(files), key=lambda file: file.name)


def _gguf_identity(record_file: Path) -> bytes:
    """The GGUF's sha256 as converted_gguf_folder recorded it; the record's bytes if it has none."""
    raw = record_file.read_bytes()
    try:
        record = json.loads(raw)
    except ValueError:
        return raw
    sha = record.get("sha256") if isinstance(record, dict) else None
    return f"gguf-sha256:{sha}".encode() if isinstance(sha, str) else raw


def folder_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in weight_files(folder):
        digest.update(f"weights {file.name}:{file_hash(file)}\n".encode())
    for name in META_FILES:
        file = folder / name
        if file.is_file():
            digest.update(f"file {name}:{content_sha256(file)}\n".encode())
    if (folder / GGUF_RECORD).is_file():
        digest.update(b"gguf " + _gguf_identity(folder / GGUF_RECORD) + b"\n")
    return digest.hexdigest()[:32]


def hub_commit(repo_id: str, revision: str | None, filename: str = "config.json") -> str | None:
    """The commit `revision` (default main) of a hub repo resolves to in the local hub cache; None
    when the cache does not say. Reads only the local cache, never the network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, filename, revision=revision)
    except ValueError:  # an id or file name the hub library refuses
        return None
    if not isinstance(cached, str):
        return None
    parts = Path(cached).parts
    if "snapshots" not in parts or parts.index("snapshots") + 1 >= len(parts):
        return None
    commit = parts[parts.index("snapshots") + 1]
    return commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None


def model_fingerprint(source: ModelSource, revision: str | None = None) -> str:
    """The model's identity by content (see the module docstring); `revision` is model.revision,
    used for a hub id."""
    path = Path(source.path)
    if path.is_dir():
        return folder_fingerprint(path)
    if path.is_file():
        return f"file:{content_sha256(path)[:32]}"
    commit = hub_commit(source.path, revision, source.gguf_file or "config.json")
    identity = f"hub:{source.path}@{commit or revision or 'unresolved'}"
    return identity + (f":{source.gguf_file}" if source.gguf_file else "")


def is_pinned(fingerprint: str) -> bool:
    """False for an identity that can move: a hub id whose revision is not resolved to a commit."""
    return not fingerprint.startswith("hub:") or _PINNED.fullmatch(fingerprint) is not None
