"""Frozen linear layers' forward on oneDNN instead of MKL, on the CPU in fp32 (training speed).

PyTorch runs every fp32 CPU matmul on MKL's sgemm. It also ships oneDNN, whose matmul
`torch.ops.mkldnn._linear_pointwise` is the kernel torch.compile's CPU backend emits for linear
layers. Timed interleaved on this machine (AMD EPYC, 2 cores, AVX2) on SmolLM2's training shapes
(2048 tokens x 576 -> 1536, 1536 -> 576, 576 -> 576), oneDNN's forward ran 14-21% faster; the
chunked loss's (49,152 x 576) x (576 x 256) logits 16% faster. For the input gradient (grad @ W)
oneDNN was faster on two shapes and 16% slower on the third, so backward stays on MKL: one rule
for every run, so a resumed run takes the same kernels as the run it continues.

Only plain nn.Linear layers with a frozen fp32 weight and bias on the CPU are switched (the base
layers under LoRA, the MLPs, a frozen head): there is no weight gradient to compute, and autograd
keeps what it keeps for F.linear there (the weight alone). Results equal MKL's to fp32 rounding,
not bit for bit. Measured cost: SmolLM2 LoRA's training peak was about 0.1 GiB higher with it
(2.66-2.75 GiB against 2.54-2.61 GiB over three alternating pairs of runs). torch.compile would pick the same kernel, but it recompiles for every shape and does
not trace peft's adapters cheaply, so the switch is made here, per module.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

_linear_pointwise = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_active: list[bool] = []  # non-empty while `frozen_linears_on_onednn` is on (the loss reads it)


def onednn_usable(weight: torch.Tensor) -> bool:
    return (
        _linear_pointwise is not None
        and torch.backends.mkldnn.is_available()
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
    )


class _OneDnnLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:  # x (..., in), weight (out, in) frozen -> (..., out)
        ctx.save_for_backward(weight)
        return _linear_pointwise(x, weight, bias, "none", [], "")  # type: ignore[misc]

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
    if _active and not tracked and dense and onednn_usable(a):
        return _linear_pointwise(a, b, None, "none", [], "")  # type: ignore[misc]
    return a @ b.T


@contextlib.contextmanager
def frozen_linears_on_onednn(model: nn.Module | None) -> Iterator[int]:
    """Within the block, plain nn.Linear layers with a frozen fp32 CPU weight run their forward on
    oneDNN, and so do `matmul_nt`'s fp32 CPU products; yields how many layers were switched (0
    without a model, off the CPU, or without oneDNN)."""
    # A module whose forward is already patched (accelerate's hooks, another switch) is left.
    switched = [
        module
        for module in (model.modules() if model is not None else ())
        if type(module) is nn.Linear
        and "forward" not in vars(module)
        and _frozen(module)
        and onednn_usable(module.weight)
    ]
    if model is not None:
        _active.append(True)
    try:
        for module in switched:
            module.forward = types.MethodType(_onednn_forward, module)  # type: ignore[method-assign]
        yield len(switched)
    finally:
        if model is not None:
            _active.pop()
        for module in switched:
            vars(module).pop("forward", None)  # back to the class's own forward
