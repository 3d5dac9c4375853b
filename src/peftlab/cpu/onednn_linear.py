"""Frozen linear layers' forward on oneDNN instead of MKL, on the CPU in fp32 (training speed).

PyTorch runs every fp32 CPU matmul on MKL's sgemm. It also ships oneDNN, whose matmul
`torch.ops.mkldnn._linear_pointwise` is the kernel torch.compile's CPU backend emits for linear
layers. On SmolLM2's training shapes oneDNN's forward was faster, and so were the chunked loss's
logits; for the input gradient (grad @ W) it was faster on some shapes and slower on others, so
backward stays on MKL: one rule for every run, so a resumed run takes the same kernels as the run
it continues (measured figures: README, "Training speed").

Only plain nn.Linear layers with a frozen fp32 weight and bias on the CPU are switched (the base
layers under LoRA, the MLPs, a frozen head): there is no weight gradient to compute, and autograd
keeps what it keeps for F.linear there (the weight alone). Results equal MKL's to fp32 rounding, not bit for
bit; it costs some peak RSS in memory glibc keeps (README). torch.compile would pick the same
kernel, but it recompiles for every shape and does not trace peft's adapters cheaply, so the
switch is made here, per module.

The oneDNN op is private: it is looked up when the switch turns on, and where it is missing the
switch stays off and says why (`unavailable`). Whether `matmul_nt` uses it is kept per thread, so
a run in another thread with the switch off keeps MKL.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


@functools.cache
def _linear_pointwise() -> Callable[..., torch.Tensor] | None:
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def unavailable() -> str | None:
    """Why frozen linears cannot run on oneDNN with this torch build, or None."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if _linear_pointwise() is None:
        return "this torch lacks torch.ops.mkldnn._linear_pointwise"
    return None


class _ThreadSwitch(threading.local):
    def __init__(self) -> None:
        self.depth = 0  # active `frozen_linears_on_onednn` blocks of this thread (the loss reads it)


_this_thread = _ThreadSwitch()


def onednn_usable(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and unavailable() is None


class _OneDnnLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:  # x (..., in), weight (out, in) frozen -> (..., out)
        ctx.save_for_backward(weight)
        return _linear_pointwise()(x, weight, bias, "none", [], "")  # type: ignore[misc]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        return grad @ weight, None, None  # (..., out) @ (out, in): MKL, as F.linear's backward


def _frozen(module: nn.Linear) -> bool:
    return not module.weight.requires_grad and (module.bias is None or not module.bias.requires_grad)


def _onednn_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # The kernel takes dense fp32 CPU operands; _OneDnnLinear's backward has no weight or bias
    # gradient, so a layer unfrozen since the switch goes back to F.linear.
    if (
        x.dtype != torch.float32
        or x.device.type != "cpu"
        or not (x.is_contiguous() and self.weight.is_contiguous())
        or not _frozen(self)
    ):
        return nn.functional.linear(x, self.weight, self.bias)
    return _OneDnnLinear.apply(x, self.weight, self.bias)


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T; on oneDNN while `frozen_linears_on_onednn` is on (the chunked loss's logits, which
    computes its own gradients). The oneDNN op has no autograd formula: with a grad path, torch's."""
    tracked = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    dense = a.is_contiguous() and b.is_contiguous() and b.dtype == a.dtype
    if _this_thread.depth and not tracked and dense and onednn_usable(a):
        return _linear_pointwise()(a, b, None, "none", [], "")  # type: ignore[misc]
    return a @ b.T


@contextlib.contextmanager
def frozen_linears_on_onednn(model: nn.Module | None) -> Iterator[int]:
    """Within the block, plain nn.Linear layers with a frozen fp32 CPU weight run their forward on
    oneDNN, and so do this thread's `matmul_nt` fp32 CPU products; yields how many layers were
    switched (0 without a model, off the CPU, or without oneDNN). Each switched module's own
    forward is removed again in `finally` (only where it is still this switch's)."""
    # A module whose forward is already patched (accelerate's hooks, another switch) is left.
    switched = [
        module
        for module in (model.modules() if model is not None else ())
        if type(module) is nn.Linear
        and "forward" not in vars(module)
        and _frozen(module)
        and onednn_usable(module.weight)
    ]
    on = model is not None and unavailable() is None
    forwards = {}
    if on:
        _this_thread.depth += 1
    try:
        for module in switched:
            forwards[module] = module.forward = types.MethodType(_onednn_forward, module)  # type: ignore[method-assign]
        yield len(switched)
    finally:
        if on:
            _this_thread.depth -= 1
        for module, forward in forwards.items():
            if vars(module).get("forward") is forward:
                del module.forward  # back to the class's own forward
