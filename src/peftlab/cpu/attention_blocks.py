"""Causal attention on the CPU in query blocks, so the masked upper triangle is not computed.

PyTorch's CPU flash-attention kernel skips masked work only a whole key block (512 keys) at a
time, so at 512 tokens or fewer a causal forward and backward cost as much as full attention.
`_CausalBlocks` runs the same kernel once per block of 128 queries, each against only the keys
before it (its key prefix, with an additive mask on the diagonal block), so the work falls to
10/16 of the square at 512 tokens (measured figures: README, "Training speed").

Backward calls the kernel's own backward per block with that block's rows of the output and of
the log-sum-exp: those are all a block's gradients depend on (the same split ring attention
uses), so the result equals one whole-sequence call to float rounding. Autograd keeps what it
keeps for one call (query, key, value, the output in the (batch, seq, heads, dim) layout
o_proj reads, the log-sum-exp), so the estimator's trace of stock SDPA holds for it.

Nothing in torch or transformers offers this on the CPU (flex attention's block masks need
torch.compile; CUDA's flash kernels already skip masked tiles), so it is written here and used
in place of transformers' "sdpa" attention function while training. Anything it does not cover
(a mask: padded or packed batches, sliding windows; dropout; another device or dtype than fp32 on
the CPU, where its equality is tested; other lengths) goes to transformers' own SDPA path unchanged.

The private internals it needs (transformers' attention table and SDPA function, the CPU flash
kernel's forward and backward ops) are looked up only when it switches on; where a version lacks
one, it stays off and says why (`unavailable`). The table entry is process-wide: the first active
block installs it and the last one gives the original back; which thread asked for blocks is kept
per thread, so a run in another thread with blocks off goes to the stock path.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

BLOCK_ROWS = 128
# The CPU kernel's key block: longer sequences already skip whole masked key blocks (measured
# no faster in query blocks at 1024 and 2048 tokens), shorter ones than two blocks gain nothing.
KERNEL_KEY_BLOCK = 512


@dataclass(frozen=True)
class _Internals:
    table: Any  # transformers' ALL_ATTENTION_FUNCTIONS
    global_mapping: Any  # AttentionInterface._global_mapping
    sdpa: Callable[..., Any]  # transformers' own "sdpa" function
    flash: Callable[..., Any]  # aten._scaled_dot_product_flash_attention_for_cpu
    flash_backward: Callable[..., Any]


@functools.cache
def _internals() -> _Internals | str:
    """The private pieces this needs, or why they are missing (looked up once, when first used)."""
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

        return _Internals(
            ALL_ATTENTION_FUNCTIONS,
            AttentionInterface._global_mapping,
            sdpa_attention_forward,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward,
        )
    except (ImportError, AttributeError, RuntimeError) as exc:
        return f"this torch/transformers lacks an internal it needs ({type(exc).__name__}: {exc})"


def unavailable() -> str | None:
    """Why query blocks cannot switch on with the installed versions, or None."""
    found = _internals()
    return found if isinstance(found, str) else None


def _ops() -> _Internals:
    found = _internals()
    assert not isinstance(found, str), found  # callers switch on only when available
    return found


def block_starts(seq: int, rows: int = BLOCK_ROWS) -> list[tuple[int, int]]:
    return [(start, min(start + rows, seq)) for start in range(0, seq, rows)]


@functools.lru_cache(maxsize=64)
def _diagonal_mask(start: int, end: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """(1, 1, end-start, end) additive mask: query start+i sees keys 0..start+i."""
    rows = torch.arange(start, end, device=device)[:, None]
    cols = torch.arange(end, device=device)[None, :]
    mask = torch.zeros(end - start, end, dtype=dtype, device=device)
    return mask.masked_fill(cols > rows, float("-inf"))[None, None]


class _CausalBlocks(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
    ) -> torch.Tensor:  # query (B, H, S, D), key/value (B, KV, S, D) -> (B, S, H, D)
        batch, heads, seq, _ = query.shape
        out = query.new_empty(batch, seq, heads, value.shape[-1])
        lse = query.new_empty(batch, heads, seq, dtype=torch.float32)
        blocks = block_starts(seq)
        for start, end in blocks:
            mask = _diagonal_mask(start, end, query.dtype, query.device.type)
            block_out, block_lse = _ops().flash(
                query[:, :, start:end], key[:, :, :end], value[:, :, :end], attn_mask=mask, scale=scale
            )
            out[:, start:end] = block_out.transpose(1, 2)
            lse[:, :, start:end] = block_lse
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.scale, ctx.blocks = scale, blocks
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, value, out, lse = ctx.saved_tensors
        grad_query = torch.empty_like(query)
        grad_key: torch.Tensor | None = None  # the last block's (whole-prefix) gradients, then +=
        grad_value: torch.Tensor | None = None
        for start, end in reversed(ctx.blocks):
            mask = _diagonal_mask(start, end, query.dtype, query.device.type)
            block_query, block_key, block_value = _ops().flash_backward(
                grad_out[:, start:end].transpose(1, 2),
                query[:, :, start:end],
                key[:, :, :end],
                value[:, :, :end],
                out[:, start:end].transpose(1, 2),
                lse[:, :, start:end],
                0.0,
                False,
                attn_mask=mask,
                scale=ctx.scale,
            )
            grad_query[:, :, start:end] = block_query
            if grad_key is None or grad_value is None:
                grad_key, grad_value = block_key, block_value
            else:
                grad_key[:, :, :end] += block_key
                grad_value[:, :, :end] += block_value
        return grad_query, grad_key, grad_value, None


def causal_blocks_apply(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether a plain causal self-attention of these shapes gains from query blocks here."""
    seq = query.shape[2]
    return (
        query.device.type == "cpu"
        and query.dtype == torch.float32  # the dtype its equality with stock SDPA is tested in
        and key.shape[2] == value.shape[2] == seq
        and 2 * BLOCK_ROWS <= seq <= KERNEL_KEY_BLOCK
        and query.dtype == key.dtype == value.dtype
        and query.shape[-1] == key.shape[-1] == value.shape[-1]  # the flash kernel's one head size
        and query.shape[0] == key.shape[0] == value.shape[0]  # no broadcast batch
        and query.shape[1] % key.shape[1] == 0
        and all(t.stride(-1) == 1 for t in (query, key, value))  # the kernel reads rows as dense
    )


def causal_blocks_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; what it does not cover, and every call from a
    thread that did not ask for blocks, goes to the "sdpa" function it replaced."""
    tally = _this_thread.stack[-1] if _this_thread.stack else None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    plain = (
        causal
        and attention_mask is None
        and dropout == 0.0
        and all(kwargs.get(name) is None for name in ("position_bias", "softcap", "sinks"))
        and not kwargs.get("output_attentions", False)
    )
    if tally is not None and plain and causal_blocks_apply(query, key, value):
        tally.calls += 1
        return _CausalBlocks.apply(query, key, value, scaling), None
    stock = _installed.replaced if _installed.replaced is not None else _ops().sdpa
    return stock(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        **kwargs,
    )


@dataclass(eq=False)
class BlockedCalls:
    """An active `causal_attention_in_blocks`: how many attention calls of its thread went in
    query blocks meanwhile."""

    calls: int = 0


class _ThreadTallies(threading.local):
    def __init__(self) -> None:
        self.stack: list[BlockedCalls] = []  # this thread's active blocks, innermost last


@dataclass
class _Installation:
    """The process-wide table entry: how many blocks (any thread) are active, and what "sdpa"
    was before the first of them."""

    active: int = 0
    replaced: Callable[..., Any] | None = None
    had_local_entry: bool = False


_this_thread = _ThreadTallies()
_installed = _Installation()
_lock = threading.Lock()


def _install() -> None:
    ops = _ops()
    with _lock:
        if _installed.active == 0:
            _installed.replaced = ops.table["sdpa"]
            _installed.had_local_entry = _installed.replaced is not ops.global_mapping.get("sdpa")
            ops.table["sdpa"] = causal_blocks_attention
        _installed.active += 1


def _uninstall() -> None:
    ops = _ops()
    with _lock:
        _installed.active -= 1
        if _installed.active > 0:
            return
        if ops.table["sdpa"] is causal_blocks_attention:  # else someone replaced it since: theirs stays
            if _installed.had_local_entry and _installed.replaced is not None:
                ops.table["sdpa"] = _installed.replaced
            else:
                del ops.table["sdpa"]  # back to transformers' global entry
        _installed.replaced, _installed.had_local_entry = None, False


@contextlib.contextmanager
def causal_attention_in_blocks(enabled: bool) -> Iterator[BlockedCalls | None]:
    """Within the block, this thread's unmasked causal fp32 CPU attention runs in query blocks:
    transformers' "sdpa" attention function is `causal_blocks_attention` (which hands what it does
    not cover to the function it replaced). Yields the tally of blocked calls, or None when not
    enabled or not available (`unavailable` says why). The model's configured implementation is
    left as it is, so mask building and every check a model makes for "sdpa" stay the same;
    models on eager or flash attention never call it. Blocks nest and overlap across threads:
    each removes its own tally, and the last one out restores the table."""
    if not enabled or unavailable() is not None:
        yield None
        return
    tally = BlockedCalls()
    _install()
    _this_thread.stack.append(tally)
    try:
        yield tally
    finally:
        _this_thread.stack.remove(tally)  # by identity (eq=False): its own, whatever the order
        _uninstall()
