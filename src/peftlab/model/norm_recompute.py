"""Norm outputs rebuilt in backward instead of kept from the forward (training memory).

A LoRA adapter on q/k/v keeps its input for the gradient of A, and that input is the output of
the layer's input norm: one (batch x seq x hidden) tensor per layer that autograd holds from the
forward until backward. It is a cheap elementwise function of the norm's input, which the norm
keeps for its own backward anyway. Within `norms_recomputed`, autograd's saved-tensor hooks keep
a recipe (the norm and its input) in place of such a tensor, and backward reruns the norm when it
needs the tensor: the same ops on the same input, so the same values bit for bit: one
(batch x seq x hidden) tensor less per layer (measured figures: README).

torch.utils.checkpoint cannot do this: it recomputes what a region saves inside itself, while
this tensor is saved by the next module (the adapter), and checkpointing that module would rerun
its matmuls too. Nothing in torch, peft or transformers drops a tensor saved by one module on the
grounds that another module can rebuild it, so it is written here with the documented hooks.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

# While saved-tensor hooks are active autograd no longer checks that a saved tensor was left
# alone until backward, so the hooks below check it themselves, with autograd's own words.
MODIFIED = (
    "one of the variables needed for gradient computation has been modified by an inplace "
    "operation (found by peftlab's saved-tensor hooks, model/norm_recompute.py)"
)


def _versions(module: torch.nn.Module) -> tuple[int, ...]:
    return tuple(p._version for p in module.parameters())


@dataclass
class _Recipe:
    """How to rebuild one norm output: the norm and its input (held only while saved for backward)."""

    norm: torch.nn.Module
    input: torch.Tensor
    input_version: int  # the input's version when the norm ran
    param_versions: tuple[int, ...]  # the norm weights' versions when it ran
    shape: torch.Size
    built: torch.Tensor | None = field(default=None, repr=False)

    def rebuild(self) -> torch.Tensor:
        if self.input._version != self.input_version or _versions(self.norm) != self.param_versions:
            raise RuntimeError(MODIFIED)
        # q, k and v's adapters each saved the same output: rebuild once, share it until the
        # last of them has run backward (the recipe is freed with them).
        if self.built is None:
            with torch.no_grad():
                self.built = self.norm(self.input)
            if self.built.shape != self.shape or not self.built.is_contiguous():
                raise RuntimeError("a norm rebuilt in backward gave an output unlike its forward's")
        return self.built


@dataclass
class _Output:
    """A norm output seen in the forward: what rebuilds it and the versions that say it still can,
    plus (once saved) a weak ref to the recipe its saved views share."""

    norm: torch.nn.Module
    input: weakref.ref[torch.Tensor]  # weak: an output nobody saves must not keep this alive
    input_version: int
    param_versions: tuple[int, ...]
    version: int  # the output's own: an output changed in place is no longer norm(input)
    dtype: torch.dtype
    shape: torch.Size
    recipe: weakref.ref[_Recipe] | None = None


@dataclass(frozen=True)
class _Saved:
    """A saved view of a norm output: the recipe plus the view's geometry."""

    recipe: _Recipe
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


Packed = tuple[torch.Tensor, int] | _Saved  # a tensor kept as it is (with its version), or a recipe


class NormRecompute:
    """Saved-tensor hooks that keep recipes for the outputs of `norms` (see the module docstring)."""

    def __init__(self, norms: Iterable[torch.nn.Module]) -> None:
        # output storage -> what rebuilds it; filled by forward hooks, read when autograd saves a
        # tensor. A StorageWeakRef keeps its storage's bookkeeping allocated after the data is
        # freed, so no later storage can share a key: a hit is exactly that output's storage.
        self._outputs: dict[StorageWeakRef, _Output] = {}
        # Storages autograd keeps as they are. A recipe saves memory only where the norm's input
        # is among them: layer 0's input (embeddings that need no grad) and a bf16 input (the norm
        # keeps its fp32 copy) are not, and a recipe would keep them alive in place of the output.
        self._kept: set[StorageWeakRef] = set()
        # Saved-tensor hooks are per thread: only forwards in this thread can use recipes (the
        # replicas of nn.DataParallel run in threads of their own and share these forward hooks).
        self._thread = threading.get_ident()
        self.recipes = 0  # norm outputs replaced by a recipe so far
        self._handles = [norm.register_forward_hook(self._remember, with_kwargs=True) for norm in norms]

    def __len__(self) -> int:
        return len(self._handles)

    def _remember(
        self, norm: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        # Only norm(x): a norm with more inputs (a gated norm's gate) is not rebuilt from x alone.
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor) or not torch.is_grad_enabled():
            return
        norm_input = args[0]
        if not isinstance(output, torch.Tensor) or output.storage_offset() != 0 or not output.is_contiguous():
            return
        if threading.get_ident() != self._thread or output.untyped_storage() is norm_input.untyped_storage():
            return
        if len(self._outputs) > 4 * len(self._handles):  # outputs of past forwards: freed by now
            self._outputs = {key: out for key, out in self._outputs.items() if not key.expired()}
            self._kept = {key for key in self._kept if not key.expired()}
        self._outputs[StorageWeakRef(output.untyped_storage())] = _Output(
            norm,
            weakref.ref(norm_input),
            norm_input._version,
            _versions(norm),
            output._version,
            output.dtype,
            output.shape,
        )

    def _recipe(self, tensor: torch.Tensor, output: _Output) -> _Recipe | None:
        if tensor.dtype != output.dtype or tensor._version != output.version:
            return None
        recipe = output.recipe() if output.recipe is not None else None
        if recipe is not None:
            return recipe
        norm_input = output.input()
        if (
            norm_input is None
            or norm_input._version != output.input_version
            or StorageWeakRef(norm_input.untyped_storage()) not in self._kept
        ):
            return None
        recipe = _Recipe(output.norm, norm_input, output.input_version, output.param_versions, output.shape)
        output.recipe = weakref.ref(recipe)  # q, k and v's adapters save views of one output
        self.recipes += 1
        return recipe

    def pack(self, tensor: torch.Tensor) -> Packed:
        key = StorageWeakRef(tensor.untyped_storage())
        output = self._outputs.get(key)
        recipe = self._recipe(tensor, output) if output is not None else None
        if recipe is None:
            self._kept.add(key)
            return tensor, tensor._version
        return _Saved(recipe, tensor.size(), tensor.stride(), int(tensor.storage_offset()))

    @staticmethod
    def held(packed: Packed) -> torch.Tensor:
        """The tensor `packed` keeps alive until backward: itself, or its recipe's norm input
        (which autograd keeps anyway)."""
        return packed[0] if isinstance(packed, tuple) else packed.recipe.input

    @staticmethod
    def unpack(packed: Packed) -> torch.Tensor:
        if isinstance(packed, tuple):
            tensor, version = packed
            if tensor._version != version:
                raise RuntimeError(MODIFIED)
            return tensor
        return packed.recipe.rebuild().as_strided(packed.size, packed.stride, packed.offset)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._outputs.clear()
        self._kept.clear()


def layer_norms(layers: Iterable[torch.nn.Module]) -> list[torch.nn.Module]:
    """The norm modules inside the decoder layers (RMSNorm, LayerNorm and kin, by class name).

    Leaf modules without buffers only: rerunning a wrapper would rerun whatever it wraps (a
    dropout, with other random numbers), and a norm with buffers (BatchNorm's running statistics)
    would update them a second time.
    """
    return [
        m
        for layer in layers
        for m in layer.modules()
        if "norm" in type(m).__name__.lower()
        and next(m.children(), None) is None
        and next(m.buffers(), None) is None
    ]


@contextlib.contextmanager
def norms_recomputed(layers: Iterable[torch.nn.Module] | None) -> Iterator[NormRecompute | None]:
    """Within the block, the outputs of the layers' norms that autograd saves are rebuilt in
    backward instead of kept; yields the hooks (their `recipes` count), or None when off.

    Off under DeepSpeed ZeRO-3 (parameters with a `ds_id`): a norm rerun in backward would call
    the partitioned module again outside the order ZeRO-3 traced for prefetching.
    """
    layers = list(layers or [])
    if not layers or any(hasattr(p, "ds_id") for layer in layers for p in layer.parameters()):
        yield None
        return
    recompute = NormRecompute(layer_norms(layers))
    try:
        with torch.autograd.graph.saved_tensors_hooks(recompute.pack, recompute.unpack):
            yield recompute
    finally:
        recompute.remove()
