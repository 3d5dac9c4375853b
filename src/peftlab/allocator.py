"""Keep glibc's malloc from hoarding freed activation memory (CPU runs).

glibc serves large allocations with mmap, but after each free of an mmapped block it raises its
mmap threshold to that block's size (up to 32 MB), so from the second training step on, the
activation tensors come from the heap arenas, and freed heap memory is rarely given back: peak RSS
grows to about twice the live memory (measured on SmolLM2 LoRA, 512x4 fp32: 6.5 GiB against 3.7 GiB
with a fixed threshold). Fixing the thresholds with mallopt keeps large tensors on mmap, returned to
the system when freed. Nothing in torch or transformers sets this; the alternative is preloading
jemalloc/tcmalloc, which a pip install cannot do.

The price is a page fault for every fresh block: on this project's VM a SmolLM2 LoRA step took
18.5 s instead of 13.3 s. So `train.release_memory` (auto by default) decides per run (fit.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 1 << 20  # allocations above 1 MiB (a 512x576 fp32 activation is 1.2 MB) use mmap


@functools.lru_cache(maxsize=1)
def tame_glibc_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES)
    )
