"""The chunked causal-LM loss equals the model's own loss and gradients; the allocator fix works."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import peftlab.train.trainer as trainer_module
from conftest import build_tiny_llama
from peftlab.model.chunked_loss import IGNORE_INDEX, chunked_lm_loss, shifted_targets
from peftlab.train.trainer import chunked_forward_loss, chunked_loss_agrees

ROOT = Path(__file__).resolve().parents[2]


def test_shifted_targets_are_the_next_label():
    labels = torch.tensor([[5, 6, 7, IGNORE_INDEX]])
    assert shifted_targets(labels).tolist() == [[6, 7, IGNORE_INDEX, IGNORE_INDEX]]


def test_hand_computed_loss_on_a_two_token_vocabulary():
    # One row with a target: hidden [1, 0], head rows [0, 0] and [ln 3, 0] -> logits [0, ln 3],
    # target 0 -> NLL = log(1 + 3) - 0 = ln 4.
    head = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0, 0.0], [float(torch.log(torch.tensor(3.0))), 0.0]]))
    hidden = torch.tensor([[[1.0, 0.0], [9.0, 9.0]]])  # (1, 2, 2); the last position has no target
    labels = torch.tensor([[IGNORE_INDEX, 0]])
    loss = chunked_lm_loss(hidden, head, labels)
    assert loss.item() == pytest.approx(float(torch.log(torch.tensor(4.0))), rel=1e-6)


def batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (3, 16))
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX  # a prompt that carries no loss
    labels[2, 10:] = IGNORE_INDEX  # padding
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("num_items", [None, 37])
@pytest.mark.parametrize("trainable_head", [True, False])
def test_loss_and_gradients_equal_the_models_own(monkeypatch, num_items, trainable_head):
    monkeypatch.setattr(trainer_module, "CHUNK_ROWS", 7)  # several chunks, the last one partial
    model = build_tiny_llama(300, seed=0)  # tied embeddings: the head's gradient reaches them
    model.lm_head.weight.requires_grad_(trainable_head)
    inputs = batch()
    own = model(**inputs, num_items_in_batch=num_items).loss
    own.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    chunked, _ = chunked_forward_loss(model, inputs, num_items)
    chunked.backward()
    torch.testing.assert_close(chunked, own, rtol=1e-6, atol=1e-6)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and got
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_module_head_takes_the_checkpointed_path_with_the_same_gradients():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(8, 11))  # not a plain bias-free Linear
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    logits = head(hidden)[:, :-1].reshape(-1, 11)
    own = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1))
    own.backward()
    want = hidden.grad.clone(), head[0].weight.grad.clone()
    hidden.grad, head[0].weight.grad = None, None
    chunked_lm_loss(hidden, head, labels, chunk_rows=3).backward()
    torch.testing.assert_close(chunked_lm_loss(hidden, head, labels, chunk_rows=3), own)
    torch.testing.assert_close(hidden.grad, want[0])
    torch.testing.assert_close(head[0].weight.grad, want[1])


class ScaledLogitsLlama(LlamaForCausalLM):
    """A model that post-processes its logits (as Gemma-2 soft-caps and Cohere scales them)."""

    def forward(self, input_ids=None, labels=None, **kwargs):  # type: ignore[no-untyped-def]
        kwargs.pop("logits_to_keep", None)
        out = super().forward(input_ids=input_ids, **kwargs)
        out.logits = out.logits * 2
        if labels is not None:
            out.loss = self.loss_function(out.logits, labels, self.config.vocab_size)
        return out


def test_a_model_with_post_processed_logits_is_detected():
    model = build_tiny_llama(300, seed=0)
    assert chunked_loss_agrees(model, batch()) == (True, "")
    scaled = ScaledLogitsLlama(model.config)
    ok, why = chunked_loss_agrees(scaled, batch())
    assert not ok and "differs from the model's own loss" in why


def test_fixed_malloc_thresholds_give_freed_activations_back():
    script = """
import sys, psutil, torch
if sys.argv[1] == "tame":
    from peftlab.cpu.malloc import tame_glibc_malloc
    assert tame_glibc_malloc()
rss = lambda: psutil.Process().memory_info().rss
start = rss()
for _ in range(3):  # three steps' activations: 100 x 4 MiB tensors, all freed after each step
    step = [torch.ones(1 << 20) for _ in range(100)]
    del step
print((rss() - start) / 2**20)
"""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")

    # PyTorch's default allocator (huge-page allocation, which the peftlab command turns on, would
    # not hold these page-aligned buffers either: test_allocator.py)
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0"}

    def held_mib(mode: str) -> float:
        out = subprocess.run(
            [sys.executable, "-c", script, mode],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            env=env,
        )
        return float(out.stdout.strip())

    assert held_mib("tame") < 50 < held_mib("plain")
