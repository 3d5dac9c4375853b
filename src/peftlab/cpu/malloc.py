"""Keep glibc's malloc from hoarding freed activation memory (CPU runs).

glibc serves large allocations with mmap, but after each free of an mmapped block it raises its
mmap threshold to that block's size (up to 32 MB), so from the second training step on, the
activation tensors come from the heap arenas, and freed heap memory is rarely given back: peak RSS
grows to about twice the live memory. Fixing the thresholds with mallopt keeps large tensors on
mmap, returned to the system when freed. Nothing in torch or transformers sets this; the
alternative is preloading jemalloc/tcmalloc, which a pip install cannot do. The price is a page
fault for every fresh block, so `train.release_memory` (auto by default) decides per run
(sizing/plan.py); measured figures are in the README ("Memory").

mallopt cannot be undone: glibc has no call that turns its dynamic threshold back on. So the
setting is process-wide and permanent once made, and `memory_released()` says what is in effect,
whoever asked for it: a later run in the same process trains under it and records so. (A sweep
runs each point in its own process.)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Iterable, Iterator

import torch

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 1 << 20  # allocations above 1 MiB (a 512x576 fp32 activation is 1.2 MB) use mmap


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has mallopt and malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim  # musl and others have neither
    except (OSError, AttributeError):
        return None
    # Signatures once here: malloc_trim also runs in forward hooks during training.
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


_fixed = False  # set once this process's thresholds were fixed (there is no way back)


def tame_glibc_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds for the rest of this process; False where there is no
    glibc (then nothing changed)."""
    global _fixed
    libc = _glibc()
    if libc is None:
        return False
    if not _fixed:
        _fixed = bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES)
        )
    return _fixed


def memory_released() -> bool:
    """Whether this process's malloc thresholds are fixed now (by this run or an earlier one)."""
    return _fixed


def return_freed_heap() -> bool:
    """Give the heap's free pages back to the system now (glibc malloc_trim); False without glibc.

    Loading frees the checkpoint's tensors (all of them for a 4-bit base, which is quantised from
    them) and the base evaluation frees its activations; glibc keeps such freed heap memory in the
    process, where it counts in the run's peak RSS although training may never reuse it.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@contextlib.contextmanager
def heap_trimmed_every(layers: Iterable[torch.nn.Module] | None, every: int) -> Iterator[int]:
    """Within the block, give glibc's free heap pages back after the forward of every `every`-th
    layer; yields how many layers trim (0 without glibc, with every=0 or no layers).

    A forward pass frees many temporaries (projections before RoPE, LoRA products, the MLP's
    product) between the activations it keeps. glibc cannot fill all those holes with the later,
    2 MiB-aligned allocations, so at the end of a training forward much free heap is still
    resident and counted in the peak; trimming every few layers gives it back for a few more
    page faults a step (figures: README, "Memory"). The hooks are removed in `finally`.
    """
    libc = _glibc()
    chosen = list(layers or [])[every - 1 :: every] if libc is not None and every > 0 else []

    def trim(module: torch.nn.Module, args: object, output: object) -> None:
        return_freed_heap()

    handles = [layer.register_forward_hook(trim) for layer in chosen]
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()


def has_glibc() -> bool:
    return _glibc() is not None
