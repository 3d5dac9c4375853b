"""Frozen linear layers' forward on oneDNN (cpu/onednn_linear.py): which layers switch, the same loss and
gradients to fp32 rounding, frozen weights stay frozen, everything restored on exit."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from conftest import loss_and_grads, prepared_tiny_model
from peftlab.cpu import onednn_linear
from peftlab.cpu.onednn_linear import frozen_linears_on_onednn, matmul_nt

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Records the weight shape of every oneDNN call."""
    calls: list[tuple[int, ...]] = []
    kernel = onednn_linear._linear_pointwise()
    if kernel is None or onednn_linear.unavailable() is not None:
        pytest.skip("this torch build has no oneDNN linear: the switch stays off")

    def spy(x: torch.Tensor, w: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append(tuple(w.shape))
        return kernel(x, w, *args)

    monkeypatch.setattr(onednn_linear, "_linear_pointwise", lambda: spy)
    return calls


def test_lora_trains_the_same_with_frozen_layers_on_onednn(
    tiny_tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = prepared_tiny_model(
        len(tiny_tokenizer), {"name": "lora", "r": 4, "dropout": 0.0, "target_modules": QKVO}
    )
    ids = torch.randint(3, len(tiny_tokenizer), (2, 24))
    loss, grads = loss_and_grads(model, input_ids=ids, labels=ids)
    calls = _spy(monkeypatch)
    with frozen_linears_on_onednn(model) as switched:
        onednn_loss, onednn_grads = loss_and_grads(model, input_ids=ids, labels=ids)
    # 2 layers x (q, k, v, o base layers + gate, up, down) + the tied, frozen lm_head
    assert switched == 2 * 7 + 1
    assert len(calls) == 2 * 7 + 1  # one forward, each switched layer once (the head: one logits call)
    assert (64, 64) in calls and (128, 64) in calls  # q_proj's and gate_proj's weights
    assert all(shape[0] != 4 and shape[1] != 4 for shape in calls)  # never a rank-4 adapter
    torch.testing.assert_close(onednn_loss, loss, rtol=1e-6, atol=1e-6)
    # only the adapters get gradients, the same as on MKL to fp32 rounding
    assert onednn_grads.keys() == grads.keys() and all("lora_" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(onednn_grads[name], grad, rtol=1e-4, atol=1e-6)
    assert all("forward" not in vars(m) for m in model.modules())  # the class forwards are back
    calls.clear()
    model(input_ids=ids)
    assert calls == []


def test_trainable_layers_and_odd_inputs_stay_on_torch(
    tiny_tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = prepared_tiny_model(len(tiny_tokenizer), {"name": "full"})
    with frozen_linears_on_onednn(full) as switched:
        assert switched == 0  # every weight trains: its gradient needs the stock backward
    frozen = torch.nn.Linear(8, 4).requires_grad_(False)
    calls = _spy(monkeypatch)
    with frozen_linears_on_onednn(frozen) as switched:
        assert switched == 1
        x = torch.randn(8, 6).T  # (6, 8), not contiguous
        torch.testing.assert_close(frozen(x), torch.nn.functional.linear(x, frozen.weight, frozen.bias))
        assert calls == []
        y = frozen(torch.randn(6, 8))
        assert calls == [(4, 8)] and y.shape == (6, 4)
    with frozen_linears_on_onednn(None) as switched:
        assert switched == 0


def test_a_trainable_bias_under_a_frozen_weight_keeps_its_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRA's bias="all" trains biases of frozen layers: such a layer stays on F.linear, also when
    its bias is unfrozen after the switch."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    layer.weight.requires_grad_(False)
    frozen = torch.nn.Linear(8, 4).requires_grad_(False)
    calls = _spy(monkeypatch)
    x = torch.randn(6, 8)
    with frozen_linears_on_onednn(torch.nn.Sequential(layer, frozen)) as switched:
        assert switched == 1  # `frozen` only
        layer(x).sum().backward()
        assert layer.bias.grad is not None and torch.equal(layer.bias.grad, torch.full((4,), 6.0))
        frozen.bias.requires_grad_(True)  # unfrozen after the switch
        frozen(x).sum().backward()
        assert calls == [] and torch.equal(frozen.bias.grad, torch.full((4,), 6.0))


def test_forwards_come_back_when_the_block_raises_and_other_patches_are_left() -> None:
    layer = torch.nn.Linear(8, 4).requires_grad_(False)
    patched = torch.nn.Linear(8, 4).requires_grad_(False)

    def theirs(x: torch.Tensor) -> torch.Tensor:  # e.g. accelerate's hook wrapper
        return x

    patched.forward = theirs  # type: ignore[method-assign]
    model = torch.nn.Sequential(layer, patched)
    with pytest.raises(RuntimeError, match="stop"), frozen_linears_on_onednn(model) as switched:
        assert switched == 1 and "forward" in vars(layer)
        raise RuntimeError("stop")
    assert "forward" not in vars(layer) and patched.forward is theirs
    assert onednn_linear._this_thread.depth == 0


def test_matmul_nt_is_a_times_b_transposed_on_either_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = torch.randn(50, 16), torch.randn(7, 16)
    calls = _spy(monkeypatch)
    outside = matmul_nt(a, b)
    assert calls == []
    with frozen_linears_on_onednn(torch.nn.Linear(2, 2)):
        inside = matmul_nt(a, b)
    assert calls == [(7, 16)]
    torch.testing.assert_close(outside, a @ b.T)
    torch.testing.assert_close(inside, a @ b.T, rtol=1e-5, atol=1e-5)
