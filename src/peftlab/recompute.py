"""Norm outputs rebuilt in backward instead of kept from the forward (training memory).

A LoRA adapter on q/k/v keeps its input for the gradient of A, and that input is the output of
the layer's input norm: one (batch x seq x hidden) tensor per layer that autograd holds from the
forward until backward. It is a cheap elementwise function of the norm's input, which the norm
keeps for its own backward anyway. Within `norms_recomputed`, autograd's saved-tensor hooks keep
a recipe (the norm and its input) in place of such a tensor, and backward reruns the norm when it
needs the tensor: the same ops on the same input, so the same values bit for bit. On SmolLM2-135M
with LoRA on q,k,v,o (512 x 4 tokens, fp32) that is 4.7 MB a layer, 141 MB over its 30 layers.

torch.utils.checkpoint cannot do this: it recomputes what a region saves inside itself, while
this tensor is saved by the next module (the adapter), and checkpointing that module would rerun
its matmuls too. Nothing in torch, peft or transformers drops a tensor saved by one module on the
grounds that another module can rebuild it, so it is written here with the documented hooks.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef


@dataclass
class _Recipe:
    """How to rebuild one norm output: the norm and its input (held only while saved for backward)."""

    norm: torch.nn.Module
    input: torch.Tensor
    input_version: int  # the input's version when the norm ran
    shape: torch.Size
    built: torch.Tensor | None = field(default=None, repr=False)

    def rebuild(self) -> torch.Tensor:
        if self.input._version != self.input_version:
            raise RuntimeError(
                "a norm's input was modified in place after the forward; set "
                "train.recompute_norms=false for this model"
            )
        # q, k and v's adapters each saved the same output: rebuild once, share it until the
        # last of them has run backward (the recipe is freed with them).
        if self.built is None:
            with torch.no_grad():
                self.built = self.norm(self.input)
            if self.built.shape != self.shape or not self.built.is_contiguous():
                raise RuntimeError("a norm rebuilt in backward gave a different shape")
        return self.built


@dataclass
class _Output:
    """A norm output seen in the forward: what rebuilds it and the versions that say it still can,
    plus (once saved) a weak ref to the recipe its saved views share."""

    norm: torch.nn.Module
    input: weakref.ref[torch.Tensor]  # weak: an output nobody saves must not keep this alive
    input_version: int
    version: int  # the output's own: an output changed in place is no longer norm(input)
    dtype: torch.dtype
    shape: torch.Size
    recipe: weakref.ref[_Recipe] | None = None

    def shared(self) -> _Recipe | None:
        return self.recipe() if self.recipe is not None else None


@dataclass(frozen=True)
class _Saved:
    """A saved view of a norm output: the recipe plus the view's geometry."""

    recipe: _Recipe
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class NormRecompute:
    """Saved-tensor hooks that keep recipes for the outputs of `norms` (see the module docstring)."""

    def __init__(self, norms: Iterable[torch.nn.Module]):
        # output storage -> what rebuilds it; filled by forward hooks, read when autograd saves a
        # tensor. A StorageWeakRef keeps its storage's bookkeeping allocated after the data is
        # freed, so no later storage can share a key: a hit is exactly that output's storage.
        self._outputs: dict[StorageWeakRef, _Output] = {}
        # Storages autograd keeps as they are. A recipe saves memory only where the norm's input
        # is among them: layer 0's input (embeddings that need no grad) and a bf16 input (the norm
        # keeps its fp32 copy) are not, and a recipe would keep them alive in place of the output.
        self._kept: set[StorageWeakRef] = set()
        self._handles = [norm.register_forward_hook(self._remember) for norm in norms]

    def __len__(self) -> int:
        return len(self._handles)

    def _remember(self, norm: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
            return
        if not isinstance(output, torch.Tensor) or output.storage_offset() != 0 or not output.is_contiguous():
            return
        if len(self._outputs) > 4 * len(self._handles):  # outputs of past forwards: freed by now
            self._outputs = {key: out for key, out in self._outputs.items() if not key.expired()}
            self._kept = {key for key in self._kept if not key.expired()}
        norm_input = args[0]
        self._outputs[StorageWeakRef(output.untyped_storage())] = _Output(
            norm, weakref.ref(norm_input), norm_input._version, output._version, output.dtype, output.shape
        )

    def pack(self, tensor: torch.Tensor) -> torch.Tensor | _Saved:
        key = StorageWeakRef(tensor.untyped_storage())
        output = self._outputs.get(key)
        if output is None or tensor.dtype != output.dtype or tensor._version != output.version:
            self._kept.add(key)
            return tensor
        recipe = output.shared()
        if recipe is None:
            norm_input = output.input()
            if (
                norm_input is None
                or norm_input._version != output.input_version
                or StorageWeakRef(norm_input.untyped_storage()) not in self._kept
            ):
                self._kept.add(key)
                return tensor
            recipe = _Recipe(output.norm, norm_input, output.input_version, output.shape)
            # q, k and v's adapters save views of the same output: they share one recipe
            output.recipe = weakref.ref(recipe)
        return _Saved(recipe, tensor.size(), tensor.stride(), int(tensor.storage_offset()))

    @staticmethod
    def held(packed: torch.Tensor | _Saved) -> torch.Tensor:
        """The tensor `packed` keeps alive until backward: itself, or its recipe's norm input
        (which autograd keeps anyway)."""
        return packed if isinstance(packed, torch.Tensor) else packed.recipe.input

    @staticmethod
    def unpack(packed: torch.Tensor | _Saved) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        return packed.recipe.rebuild().as_strided(packed.size, packed.stride, packed.offset)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._outputs.clear()


def layer_norms(layers: Iterable[torch.nn.Module]) -> list[torch.nn.Module]:
    """The norm modules inside the decoder layers (RMSNorm, LayerNorm and kin, by class name)."""
    return [m for layer in layers for m in layer.modules() if "norm" in type(m).__name__.lower()]


@contextlib.contextmanager
def norms_recomputed(layers: Iterable[torch.nn.Module] | None) -> Iterator[int]:
    """Within the block, the outputs of the layers' norms that autograd saves are rebuilt in
    backward instead of kept; yields how many norms take part (0 without layers)."""
    if layers is None:
        yield 0
        return
    recompute = NormRecompute(layer_norms(layers))
    try:
        with torch.autograd.graph.saved_tensors_hooks(recompute.pack, recompute.unpack):
            yield len(recompute)
    finally:
        recompute.remove()
