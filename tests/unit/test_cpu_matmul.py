"""Frozen linear layers' forward on oneDNN (cpu_matmul.py): which layers switch, the same loss and
gradients to fp32 rounding, frozen weights stay frozen, everything restored on exit."""

from __future__ import annotations

import torch

from conftest import prepared_tiny_model
from peftlab import cpu_matmul
from peftlab.cpu_matmul import frozen_linears_on_onednn, matmul_nt

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _spy(monkeypatch) -> list[tuple[int, ...]]:
    calls: list[tuple[int, ...]] = []
    kernel = cpu_matmul._linear_pointwise
    assert kernel is not None, "this torch build ships oneDNN's linear"

    def spy(x, w, *args):
        calls.append(tuple(w.shape))
        return kernel(x, w, *args)

    monkeypatch.setattr(cpu_matmul, "_linear_pointwise", spy)
    return calls


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_lora_trains_the_same_with_frozen_layers_on_onednn(tiny_tokenizer, monkeypatch):
    model = prepared_tiny_model(
        len(tiny_tokenizer), {"name": "lora", "r": 4, "dropout": 0.0, "target_modules": QKVO}
    )
    ids = torch.randint(3, len(tiny_tokenizer), (2, 24))
    loss, grads = _loss_and_grads(model, ids)
    calls = _spy(monkeypatch)
    with frozen_linears_on_onednn(model) as switched:
        onednn_loss, onednn_grads = _loss_and_grads(model, ids)
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


def test_trainable_layers_and_odd_inputs_stay_on_torch(tiny_tokenizer, monkeypatch):
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


def test_matmul_nt_is_a_times_b_transposed_on_either_kernel(monkeypatch):
    a, b = torch.randn(50, 16), torch.randn(7, 16)
    calls = _spy(monkeypatch)
    outside = matmul_nt(a, b)
    assert calls == []
    with frozen_linears_on_onednn(torch.nn.Linear(2, 2)):
        inside = matmul_nt(a, b)
    assert calls == [(7, 16)]
    torch.testing.assert_close(outside, a @ b.T)
    torch.testing.assert_close(inside, a @ b.T, rtol=1e-5, atol=1e-5)
