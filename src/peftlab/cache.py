"""Where peftlab keeps what it can compute again: converted GGUF models, tokenised data, base
evaluations, the content hashes of weight files (fingerprints/). $PEFTLAB_CACHE, else $XDG_CACHE_HOME/peftlab, else ~/.cache/peftlab."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "PEFTLAB_CACHE"


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peftlab"
    return Path(os.environ.get(CACHE_ENV) or default)
