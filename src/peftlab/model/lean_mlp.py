"""Gated MLPs that keep two activations for backward instead of three (training memory).

Llama-style MLPs compute down(silu(gate(x)) * up(x)). Autograd keeps gate(x) for the activation's
backward and silu(gate(x)) and up(x) for the product's: three (batch x seq x intermediate) tensors
per layer. `SiluMul` keeps gate(x) and up(x) only and recomputes silu(gate(x)) in backward: one
(batch x seq x intermediate) tensor less per layer.

Liger-Kernel fuses the same product in Triton, for CUDA only; nothing does it on the CPU or without
Triton, so it is written here in plain torch ops, which run on every device. Only MLPs whose
forward is exactly the stock expression are switched, so the switched forward computes the same
values and the same gradients, bit for bit (its backward runs autograd's own ops). Recognising
the stock forward reads its source text, which a new transformers version may change: then no MLP
matches and nothing is switched (counted as 0). The switch lasts for a `with` block only.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

_PRODUCT = "self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))"
# The bodies of transformers' gated-MLP forwards (Llama, Mistral, Qwen2, ...), whitespace removed.
STOCK_BODIES = {f"return{_PRODUCT}", f"down_proj={_PRODUCT}returndown_proj"}


class SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving only its two inputs for backward."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # (..., I) each
        ctx.save_for_backward(gate, up)
        return nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        # The ops autograd runs for silu(gate) * up, with silu(gate) recomputed: the same values.
        grad_up = grad * nn.functional.silu(gate) if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


def _lean_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x)))  # type: ignore[operator]


@functools.cache
def _is_stock_forward(forward: Callable[..., Any]) -> bool:
    """Is `forward` exactly transformers' gated-MLP forward? (its source is read once per class)"""
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):  # no source to check: leave the module as it is
        return False
    body = source.split(":", 1)[1] if source.lstrip().startswith("def forward(self, x)") else ""
    return "".join(body.split()) in STOCK_BODIES


def _is_stock_silu_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")) or act is None:
        return False
    try:
        from transformers.activations import SiLUActivation
    except ImportError:  # a transformers without the class: nn.SiLU is still recognised
        silu_classes: tuple[type, ...] = (nn.SiLU,)
    else:
        silu_classes = (nn.SiLU, SiLUActivation)
    return type(act) in silu_classes and _is_stock_forward(type(module).forward)


@contextlib.contextmanager
def lean_gated_mlps(model: nn.Module | None) -> Iterator[int]:
    """Within the block, every stock silu-gated MLP of `model` runs `SiluMul`; yields how many
    were switched (0 without a model). Each one's own forward is removed again in `finally`."""
    forwards = {}
    try:
        for module in model.modules() if model is not None else ():
            if "forward" not in vars(module) and _is_stock_silu_mlp(module):
                forwards[module] = types.MethodType(_lean_forward, module)
                module.forward = forwards[module]
        yield len(forwards)
    finally:
        for module, forward in forwards.items():
            if vars(module).get("forward") is forward:
                del module.forward  # back to the class's own forward
