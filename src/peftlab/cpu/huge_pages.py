"""Transparent-huge-page allocation for PyTorch's CPU tensors, for the `peftlab` command only.

PyTorch's CPU allocator gives tensors of 2 MiB and more page-aligned, transparent-huge-page memory
when THP_MEM_ALLOC_ENABLE=1 is in the environment at its first allocation (c10 reads it once per
process). On a SmolLM2 LoRA step that cut page faults several-fold and peak RSS by about a quarter
at the same or better speed (README, "Memory").

An environment variable changes every large allocation of the process and of every child it
starts, so importing peftlab never sets it. The command line does, in `cli.main`, before anything
imports torch, and gives the old value back when the command ends (`for_this_command`). A library
user who wants it sets the variable before importing torch. What a run had is recorded in its
manifest (`in_effect`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

VARIABLE = "THP_MEM_ALLOC_ENABLE"
_set_by_command = False  # True while `for_this_command` has set the variable
# What torch read: c10 reads the variable once, at its first allocation, which importing torch
# makes. When torch was first imported inside `for_this_command`, this keeps what it read there,
# so later runs in the same process (after the variable is gone again) record what is in effect.
_read_by_torch: dict[str, Any] | None = None


@contextlib.contextmanager
def for_this_command() -> Iterator[bool]:
    """Within the block, THP_MEM_ALLOC_ENABLE=1 unless the user set it (a value they chose, e.g. 0,
    is kept) or torch is already imported (then it could no longer take effect). Yields whether it
    was set here; the environment is as before after the block."""
    global _set_by_command, _read_by_torch
    if VARIABLE in os.environ or "torch" in sys.modules:
        yield False
        return
    os.environ[VARIABLE] = "1"
    _set_by_command = True
    try:
        yield True
    finally:
        if "torch" in sys.modules:  # imported (and so allocated) while the variable was set
            _read_by_torch = {VARIABLE: "1", "set_by": "peftlab command"}
        _set_by_command = False
        os.environ.pop(VARIABLE, None)


def in_effect() -> dict[str, Any]:
    """For the manifest: the value c10 read at torch's first CPU allocation in this process and who
    set it; where torch was imported outside `for_this_command`, the variable's value now."""
    if _read_by_torch is not None and not _set_by_command:
        return dict(_read_by_torch)
    value = os.environ.get(VARIABLE)
    set_by = "peftlab command" if _set_by_command else ("environment" if value is not None else None)
    return {VARIABLE: value, "set_by": set_by}
