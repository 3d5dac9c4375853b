"""model/norm_recompute.py: norm outputs rebuilt in backward give the same loss and gradients bit for bit,
keep exactly one (tokens x hidden) tensor less per norm whose output an adapter saves, and refuse
a norm input changed in place after the forward."""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from conftest import prepared_tiny_model, saved_activation_bytes
from peftlab.model.norm_recompute import NormRecompute, layer_norms, norms_recomputed

IDS = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(1))
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def layers_of(model: torch.nn.Module) -> torch.nn.ModuleList:
    from peftlab.model.structure import decoder_layers

    layers = decoder_layers(model)
    assert layers is not None
    return layers


# method, norm outputs no longer kept over the tiny llama's two layers. LoRA on q,k,v,o: the input
# norm's of layer 1 (layer 0's input, the embeddings, needs no grad and is not kept, so its output
# is kept as it is). all-linear adds the post-attention norms (gate/up adapters): three. full: the
# embeddings need grad, so all four.
CASES = [
    ({"name": "lora", "r": 4, "target_modules": QKVO}, 1),
    ({"name": "lora", "r": 4, "target_modules": "all-linear"}, 3),
    ({"name": "full"}, 4),
]


def grads_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize(("method", "outputs_dropped"), CASES, ids=["lora-qkvo", "lora-all-linear", "full"])
def test_same_loss_and_gradients_and_less_kept(tiny_tokenizer, method, outputs_dropped):
    stock, lean = (
        prepared_tiny_model(len(tiny_tokenizer), method),
        prepared_tiny_model(len(tiny_tokenizer), method),
    )
    stock_loss = stock(input_ids=IDS, labels=IDS).loss
    stock_loss.backward()
    with norms_recomputed(layers_of(lean)) as recompute:
        lean_loss = lean(input_ids=IDS, labels=IDS).loss
        lean_loss.backward()
    assert recompute is not None and len(recompute) == 4  # two norms in each of the two layers
    assert recompute.recipes == outputs_dropped
    assert torch.equal(stock_loss, lean_loss)
    pairs = list(zip(grads_of(stock), grads_of(lean), strict=True))
    assert pairs
    for a, b in pairs:
        assert torch.equal(a, b)

    recompute = NormRecompute(layer_norms(layers_of(lean)))
    kept = saved_activation_bytes(lean, recompute, input_ids=IDS, logits_to_keep=1)
    recompute.remove()
    one_output = 2 * 16 * 64 * 4  # (2 x 16 tokens) x 64 hidden, fp32
    assert (
        saved_activation_bytes(lean, input_ids=IDS, logits_to_keep=1) - kept == outputs_dropped * one_output
    )


@pytest.mark.parametrize("recompute", [False, True])
def test_the_output_is_really_freed_before_backward(tiny_tokenizer, recompute):
    """Layer 1's input norm output is gone after the forward with the hooks, alive without them."""
    model = prepared_tiny_model(len(tiny_tokenizer), CASES[0][0])
    outputs: list[StorageWeakRef] = []
    norm = layers_of(model)[1].input_layernorm
    norm.register_forward_hook(
        lambda module, args, out: outputs.append(StorageWeakRef(out.untyped_storage()))
    )
    with norms_recomputed(layers_of(model) if recompute else None):
        loss = model(input_ids=IDS, labels=IDS).loss
        assert outputs[0].expired() == recompute
        loss.backward()


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_tokenizer, reentrant):
    stock, lean = (prepared_tiny_model(len(tiny_tokenizer), {"name": "full"}) for _ in range(2))
    for model in (stock, lean):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    stock(input_ids=IDS, labels=IDS).loss.backward()
    with norms_recomputed(layers_of(lean)):
        lean(input_ids=IDS, labels=IDS).loss.backward()
    for a, b in zip(grads_of(stock), grads_of(lean), strict=True):
        assert torch.equal(a, b)


class GatedNorm(torch.nn.Module):
    """norm(x) * silu(gate), the gated RMSNorm of Mamba2-style layers: x alone cannot rebuild it."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.RMSNorm(8)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * torch.nn.functional.silu(gate)


class GatedRMSNorm(torch.nn.RMSNorm):
    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x) * torch.nn.functional.silu(gate if gate is not None else x)


@pytest.mark.parametrize("as_keyword", [False, True])
def test_a_norm_called_with_more_than_its_input_is_kept_as_it_is(as_keyword):
    def grads(recompute: bool) -> torch.Tensor:
        torch.manual_seed(0)
        norm, proj = GatedRMSNorm(8), torch.nn.Linear(8, 8)
        x, gate = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
        with norms_recomputed([torch.nn.ModuleList([norm])] if recompute else None) as hooks:
            hidden = norm(x * 2, gate=gate) if as_keyword else norm(x * 2, gate)
            proj(hidden).pow(2).sum().backward()
        assert hooks is None or hooks.recipes == 0
        return proj.weight.grad

    assert torch.equal(grads(True), grads(False))


def test_only_leaf_norms_without_buffers_are_rebuilt():
    wrapper = GatedNorm()
    layer = torch.nn.ModuleList([wrapper, torch.nn.BatchNorm1d(8), torch.nn.LayerNorm(8)])
    assert layer_norms([layer]) == [wrapper.norm, layer[2]]


def test_a_saved_tensor_changed_in_place_is_refused_as_autograd_would():
    x = torch.randn(4, 8, requires_grad=True)
    with norms_recomputed([torch.nn.ModuleList([torch.nn.LayerNorm(8)])]):
        y = x * 2
        z = y.sin()  # saves y
        with torch.no_grad():
            y.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            z.sum().backward()


def test_a_norm_weight_changed_in_place_before_backward_is_refused():
    norm, proj = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with norms_recomputed([torch.nn.ModuleList([norm])]):
        out = proj(norm(x * 2)).sum()
        with torch.no_grad():
            norm.weight.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.backward()


def test_norm_input_changed_in_place_after_the_forward_is_refused():
    norm, proj = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with norms_recomputed([torch.nn.ModuleList([norm])]):
        hidden = x * 2  # the norm's input, a non-leaf
        out = proj(norm(hidden)).sum()
        with torch.no_grad():
            hidden.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.backward()


def test_a_norm_output_changed_in_place_before_it_is_saved_is_kept_as_it_is():
    def grads(recompute: bool) -> torch.Tensor:
        torch.manual_seed(0)
        norm, proj = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)
        x = torch.randn(4, 8, requires_grad=True)
        with norms_recomputed([torch.nn.ModuleList([norm])] if recompute else None):
            hidden = norm(x * 2)
            hidden.mul_(3)  # no longer norm(input): rebuilding it would give the wrong gradient
            proj(hidden).pow(2).sum().backward()
        return proj.weight.grad

    assert torch.equal(grads(True), grads(False))


@pytest.mark.parametrize(("input_needs_grad", "norm_calls"), [(True, 2), (False, 1)])
def test_only_an_output_whose_input_is_kept_anyway_is_rebuilt(input_needs_grad, norm_calls):
    """An input nobody keeps (layer 0's embeddings) would be kept alive by the recipe in place of
    the output: no memory saved, so the output is kept as it is and the norm is not rerun."""
    norm, proj = torch.nn.LayerNorm(8).requires_grad_(False), torch.nn.Linear(8, 8)
    calls = []
    norm.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(4, 8, requires_grad=input_needs_grad)
    with norms_recomputed([torch.nn.ModuleList([norm])]):
        hidden = x * 2
        proj(norm(hidden)).pow(2).sum().backward()
    assert len(calls) == norm_calls


def test_hooks_are_gone_after_the_block_and_no_grad_forwards_keep_nothing(tiny_tokenizer):
    model = prepared_tiny_model(len(tiny_tokenizer), CASES[0][0])
    norms = layer_norms(layers_of(model))
    with norms_recomputed(layers_of(model)):
        assert all(len(n._forward_hooks) == 1 for n in norms)
    assert all(not n._forward_hooks for n in norms)

    recompute = NormRecompute(norms)
    with torch.no_grad():
        model(input_ids=IDS)
    assert not recompute._outputs
    recompute.remove()
    with norms_recomputed(None) as off:
        assert off is None
