"""recompute.py: norm outputs rebuilt in backward give the same loss and gradients bit for bit,
keep exactly one (tokens x hidden) tensor less per norm whose output an adapter saves, and refuse
a norm input changed in place after the forward."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_llama, saved_activation_bytes
from peftlab.config import validate_config
from peftlab.methods import get_method
from peftlab.recompute import NormRecompute, layer_norms, norms_recomputed

IDS = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(1))
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def prepared(vocab: int, method: dict) -> torch.nn.Module:
    cfg = validate_config({"data": {"train_path": "unused"}, "method": method})
    return get_method(method["name"]).prepare(build_tiny_llama(vocab, hidden_size=64), cfg.method).train()


def layers_of(model: torch.nn.Module) -> torch.nn.ModuleList:
    from peftlab.models import decoder_layers

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


@pytest.mark.parametrize(("method", "outputs_dropped"), CASES, ids=["lora-qkvo", "lora-all-linear", "full"])
def test_same_loss_and_gradients_and_less_kept(tiny_tokenizer, method, outputs_dropped):
    stock, lean = prepared(len(tiny_tokenizer), method), prepared(len(tiny_tokenizer), method)
    stock_loss = stock(input_ids=IDS, labels=IDS).loss
    stock_loss.backward()
    with norms_recomputed(layers_of(lean)) as count:
        lean_loss = lean(input_ids=IDS, labels=IDS).loss
        lean_loss.backward()
    assert count == 4  # two norms in each of the two layers
    assert torch.equal(stock_loss, lean_loss)
    pairs = [(a, b) for a, b in zip(stock.parameters(), lean.parameters(), strict=True) if a.requires_grad]
    assert pairs
    for a, b in pairs:
        assert torch.equal(a.grad, b.grad)

    recompute = NormRecompute(layer_norms(layers_of(lean)))
    kept = saved_activation_bytes(lean, recompute, input_ids=IDS, logits_to_keep=1)
    recompute.remove()
    one_output = 2 * 16 * 64 * 4  # (2 x 16 tokens) x 64 hidden, fp32
    assert (
        saved_activation_bytes(lean, input_ids=IDS, logits_to_keep=1) - kept == outputs_dropped * one_output
    )


def test_norm_input_changed_in_place_after_the_forward_is_refused():
    norm, proj = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with norms_recomputed([torch.nn.ModuleList([norm])]):
        hidden = x * 2  # the norm's input, a non-leaf
        out = proj(norm(hidden)).sum()
        with torch.no_grad():
            hidden.add_(1)
        with pytest.raises(RuntimeError, match="modified in place after the forward"):
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
    model = prepared(len(tiny_tokenizer), CASES[0][0])
    norms = layer_norms(layers_of(model))
    with norms_recomputed(layers_of(model)):
        assert all(len(n._forward_hooks) == 1 for n in norms)
    assert all(not n._forward_hooks for n in norms)

    recompute = NormRecompute(norms)
    with torch.no_grad():
        model(input_ids=IDS)
    assert not recompute._outputs
    recompute.remove()
    assert norms_recomputed(None).__enter__() == 0
