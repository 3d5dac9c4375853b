"""Measured resources: peak memory (process RSS sampled in a thread, CUDA peaks) and wall time."""

from __future__ import annotations

import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

import psutil
import torch


def ru_maxrss_bytes() -> int:
    """The kernel's max RSS of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclass
class ResourceMonitor:
    """Context manager: samples RSS every `interval` s; reads CUDA peaks on exit.

    ru_maxrss is the peak over the whole process life, so the sampled peak inside the block is what
    tells one phase from another; both are reported.
    """

    interval: float = 0.1
    peak_rss: int = 0
    start_rss: int = 0
    wall_seconds: float = 0.0
    cuda_peak_allocated: int | None = None
    cuda_peak_reserved: int | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _t0: float = 0.0

    def __enter__(self) -> ResourceMonitor:
        process = psutil.Process()
        self.start_rss = self.peak_rss = process.memory_info().rss
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self.peak_rss = max(self.peak_rss, process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.wall_seconds = time.perf_counter() - self._t0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_rss = max(self.peak_rss, psutil.Process().memory_info().rss)
        if torch.cuda.is_available():
            self.cuda_peak_allocated = torch.cuda.max_memory_allocated()
            self.cuda_peak_reserved = torch.cuda.max_memory_reserved()

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "wall_seconds": self.wall_seconds,
            "peak_rss_bytes": self.peak_rss,
            "start_rss_bytes": self.start_rss,
            "process_max_rss_bytes": ru_maxrss_bytes(),
            "cuda_peak_allocated_bytes": self.cuda_peak_allocated,
            "cuda_peak_reserved_bytes": self.cuda_peak_reserved,
        }


def gib(n_bytes: float | None) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 2**30:.2f} GiB"


def tensor_bytes(obj: object, seen: set[int] | None = None) -> int:
    """Bytes of every distinct tensor reachable from `obj` (dicts, lists, objects' attributes).

    Optimizer state is such a tree: AdamW keeps tensors per parameter, GaLore keeps a projector
    object whose attribute holds the projection matrix, bitsandbytes keeps quantisation maps.
    """
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type | torch.nn.Module):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(list(optimizer.state.values()))


def gradient_bytes(model: torch.nn.Module) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for p in _unique(model) if p.grad is not None)


def parameter_bytes(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Bytes of the parameters (and, for the whole model, buffers) as stored."""
    total = sum(p.numel() * p.element_size() for p in _unique(model) if p.requires_grad or not trainable_only)
    if not trainable_only:
        total += sum(b.numel() * b.element_size() for b in model.buffers())
    return total


def _unique(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())
