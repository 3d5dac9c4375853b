"""Causal attention in query blocks (cpu/attention_blocks.py): the same values and gradients as one
causal SDPA call, only the keys before each block computed, transformers' own path elsewhere."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from conftest import build_tiny_llama, loss_and_grads, prepared_tiny_model, saved_activation_bytes
from peftlab.cpu import attention_blocks
from peftlab.cpu.attention_blocks import (
    _CausalBlocks,
    block_starts,
    causal_attention_in_blocks,
    causal_blocks_attention,
)


def _grads(
    fn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize(
    ("heads", "kv_heads", "seq", "scale"), [(4, 4, 256, None), (9, 3, 300, None), (4, 2, 512, 0.3)]
)
def test_blocks_equal_one_causal_call(heads, kv_heads, seq, scale):
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(2, heads, seq, 16),
        torch.randn(2, kv_heads, seq, 16),
        torch.randn(2, kv_heads, seq, 16),
    )
    grad = torch.randn(2, seq, heads, 16)  # the (batch, seq, heads, dim) layout transformers takes

    def stock(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=scale)
        return out.transpose(1, 2)

    expected = _grads(stock, q, k, v, grad)
    got = _grads(lambda q, k, v: _CausalBlocks.apply(q, k, v, scale), q, k, v, grad)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
    assert got[0].is_contiguous()  # written straight into the layout o_proj reads


def test_each_block_computes_only_the_keys_before_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of the split: block i sees keys [0, end_i), so 512 tokens cost 10/16 of the square."""
    assert block_starts(512) == [(0, 128), (128, 256), (256, 384), (384, 512)]
    assert block_starts(300) == [(0, 128), (128, 256), (256, 300)]
    seen: list[tuple[int, int]] = []
    internals = attention_blocks._ops()

    def spy(q, k, v, **kwargs):
        seen.append((q.shape[2], k.shape[2]))
        return internals.flash(q, k, v, **kwargs)

    monkeypatch.setattr(attention_blocks, "_ops", lambda: dataclasses.replace(internals, flash=spy))
    _CausalBlocks.apply(torch.randn(1, 2, 512, 8), torch.randn(1, 2, 512, 8), torch.randn(1, 2, 512, 8), None)
    assert seen == [(128, 128), (128, 256), (128, 384), (128, 512)]
    assert sum(q * k for q, k in seen) / 512**2 == 10 / 16


def _lora_model(
    tokenizer: PreTrainedTokenizerFast,
) -> torch.nn.Module:  # LoRA on q,k,v,o: o_proj's adapter keeps the attention output
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    return prepared_tiny_model(
        len(tokenizer), {"name": "lora", "r": 4, "dropout": 0.0, "target_modules": targets}
    )


def test_a_lora_model_trains_the_same_in_blocks(tiny_tokenizer):
    model = _lora_model(tiny_tokenizer)
    ids = torch.randint(3, len(tiny_tokenizer), (2, 256))
    loss, grads = loss_and_grads(model, input_ids=ids, labels=ids)
    with causal_attention_in_blocks(True) as tally:
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is causal_blocks_attention
        blocked_loss, blocked_grads = loss_and_grads(model, input_ids=ids, labels=ids)
    assert tally is not None and tally.calls == 2  # one call per decoder layer
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward  # restored on exit
    assert model.get_base_model().config._attn_implementation == "sdpa"  # never renamed
    torch.testing.assert_close(blocked_loss, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == blocked_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(blocked_grads[name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["short", "padded"])
def test_what_blocks_do_not_cover_goes_to_stock_sdpa(tiny_tokenizer, case):
    model = _lora_model(tiny_tokenizer)
    seq = 64 if case == "short" else 256  # under 256 tokens two blocks would not pay
    ids = torch.randint(3, len(tiny_tokenizer), (2, seq))
    mask = torch.ones_like(ids)
    if case == "padded":
        mask[0, -10:] = 0  # a padding mask: transformers builds a 4D mask, not is_causal
    stock = model(input_ids=ids, attention_mask=mask).logits
    with causal_attention_in_blocks(True) as tally:
        switched = model(input_ids=ids, attention_mask=mask).logits
    assert tally is not None and tally.calls == 0
    assert torch.equal(switched, stock)


def test_a_model_not_on_sdpa_never_calls_it(tiny_tokenizer):
    model = build_tiny_llama(len(tiny_tokenizer))
    model.set_attn_implementation("eager")
    ids = torch.randint(3, len(tiny_tokenizer), (1, 256))
    stock = model(input_ids=ids).logits
    with causal_attention_in_blocks(True) as tally:
        assert torch.equal(model(input_ids=ids).logits, stock)
    assert tally is not None and tally.calls == 0
    assert model.config._attn_implementation == "eager"
    with causal_attention_in_blocks(False) as tally:
        assert tally is None and ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward


def test_an_override_already_in_place_is_the_fallback_and_comes_back(tiny_tokenizer):
    """A local "sdpa" override (another library's) gets what blocks do not cover, and is
    restored on exit, also when the block raises."""
    seen: list[int] = []

    def theirs(module: torch.nn.Module, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(query.shape[2])
        return sdpa_attention_forward(module, query, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = theirs
    try:
        model = build_tiny_llama(len(tiny_tokenizer))
        with pytest.raises(RuntimeError, match="stop"), causal_attention_in_blocks(True) as tally:
            model(input_ids=torch.randint(3, len(tiny_tokenizer), (1, 64)))  # short: theirs
            model(input_ids=torch.randint(3, len(tiny_tokenizer), (1, 256)))  # in blocks
            raise RuntimeError("stop")
        assert seen == [64, 64] and tally is not None and tally.calls == 2
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is theirs
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]


def test_blocks_keep_what_one_sdpa_call_keeps(tiny_tokenizer):
    """The same saved bytes as stock SDPA (query, key, value, output, log-sum-exp), so the
    estimator's trace of stock attention holds for a run in blocks."""
    model = _lora_model(tiny_tokenizer)
    ids = torch.randint(3, len(tiny_tokenizer), (1, 256))
    stock = saved_activation_bytes(model, input_ids=ids)
    with causal_attention_in_blocks(True) as tally:
        blocked = saved_activation_bytes(model, input_ids=ids)
    assert tally is not None and tally.calls == 2
    assert blocked == stock
