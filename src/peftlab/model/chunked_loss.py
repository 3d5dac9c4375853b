"""Causal-LM cross-entropy without materialising the whole (tokens x vocabulary) logits tensor.

For SmolLM2 (49,152-token vocabulary) a batch of 4 x 512 tokens has 100M logits: 400 MB in fp32,
and the stock loss keeps the logits, their fp32 copy, the log-softmax and its gradient alive at
once, so most of a LoRA run's peak memory is logits. Here the output projection and the loss are
computed a chunk of rows at a time, and the gradient of each chunk is computed right away (the
softmax minus the one-hot target), so only one chunk of logits ever exists. Only rows that have a
target are projected at all, so prompt tokens of chat and classification data cost nothing here.

Written by hand because the libraries that fuse linear + cross-entropy (Liger-Kernel,
cut-cross-entropy) need Triton/CUDA and do not run on the CPU; torchtune's chunked loss still
materialises every chunk's logits for backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.cpu.onednn_linear import matmul_nt
from peftlab.model.structure import is_plain_linear

IGNORE_INDEX = -100
CHUNK_ROWS = 256  # rows of logits alive at once (training's loss and evaluation's NLL)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T) targets of each position: position t predicts labels[t + 1]."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _chunk_softmax_t(
    weight: torch.Tensor,  # (V, H) output projection
    rows: torch.Tensor,  # (c, H)
    target: torch.Tensor,  # (c,)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk's logits, transposed, turned in place into exp(logits - row max).

    Returns (exp_t (V, c), its column sums (c,), each row's NLL (c,), whether each row's target has
    the largest logit (c,), the column indices (c,)). MKL runs weight @ rows.T at least as fast as
    rows @ weight.T for this shape (c << V, H small; up to ~1.4x measured on SmolLM2's 49,152 x 576
    head, fp32 CPU; in training it runs on oneDNN, cpu_matmul.py), and the reductions below then
    run across contiguous rows. The softmax runs in place (max, subtract, exp, sum): no full-size
    temporaries and one exp pass (torch.logsumexp allocates two and the softmax would need a
    second exp).
    """
    logits_t = matmul_nt(weight, rows).float()  # (V, c): the stock loss also upcasts to fp32
    cols = torch.arange(len(target), device=logits_t.device)
    picked = logits_t[target, cols]  # (c,) logit of each row's target
    row_max = logits_t.amax(dim=0)  # (c,)
    # The target is the argmax when its logit is the maximum (an exact tie counts as a hit);
    # torch.max with indices along dim 0 of this layout is ~10x slower than amax here.
    hit = picked >= row_max  # (c,)
    exp_t = logits_t.sub_(row_max).exp_()  # (V, c)
    norm = exp_t.sum(dim=0)  # (c,)
    return exp_t, norm, norm.log() + row_max - picked, hit, cols


@torch.no_grad()
def linear_nll_and_hits(
    rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int = CHUNK_ROWS
) -> tuple[float, int]:
    """(sum over rows of -log softmax(rows @ weight.T)[target], rows whose target has the largest
    logit), a chunk of logits at a time: evaluation's perplexity and token accuracy without the
    (tokens x vocabulary) logits. rows: (N, H); weight: (V, H); targets: (N,)."""
    nll_sum, hits = 0.0, 0
    for start in range(0, rows.shape[0], chunk_rows):
        target = targets[start : start + chunk_rows]
        _, _, nll, hit, _ = _chunk_softmax_t(weight, rows[start : start + chunk_rows], target)
        nll_sum += float(nll.sum())
        hits += int(hit.sum())
    return nll_sum, hits


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of -log softmax(hidden @ weight.T)[target], gradients computed in forward."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,  # (N, H) rows that have a target
        weight: torch.Tensor,  # (V, H) output projection
        targets: torch.Tensor,  # (N,)
        chunk_rows: int,
        need_grads: bool,
    ) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grads and hidden.requires_grad else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if need_grads and weight.requires_grad
            else None
        )
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = hidden[start : start + chunk_rows]  # (c, H)
            target = targets[start : start + chunk_rows]  # (c,)
            exp_t, norm, nll, _, cols = _chunk_softmax_t(weight, rows, target)
            total += nll.sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(sum of NLL)/d logits = softmax - one_hot(target), computed in place.
            probs_t = exp_t.div_(norm)
            probs_t[target, cols] -= 1.0
            grad_logits_t = probs_t.to(hidden.dtype)  # (V, c)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_rows] = grad_logits_t.T @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits_t @ rows).float()
        ctx.save_for_backward(
            grad_hidden if grad_hidden is not None else torch.empty(0),
            grad_weight if grad_weight is not None else torch.empty(0),
        )
        ctx.has_grads = (grad_hidden is not None, grad_weight is not None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        has_hidden, has_weight = ctx.has_grads
        scale = grad_total.float()
        return (
            (grad_hidden * scale.to(grad_hidden.dtype)) if has_hidden else None,
            (grad_weight * scale).to(ctx.weight_dtype) if has_weight else None,
            None,
            None,
            None,
        )


def _module_chunk_nll(head: nn.Module, rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(rows).float(), target, reduction="sum")


def chunked_lm_loss(
    hidden: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> torch.Tensor:
    """The causal-LM loss of `head(hidden)` against `labels`, equal to transformers' ForCausalLMLoss.

    hidden: (B, T, H) final hidden states; labels: (B, T) unshifted, IGNORE_INDEX where no loss.
    The sum of token losses is divided by `num_items_in_batch` (the target tokens of the whole
    accumulated batch, so gradient accumulation is exact) or else by this batch's target count.
    A plain bias-free nn.Linear head takes the fused path; any other head (a LoRA-wrapped or
    quantised one) is applied chunk by chunk under activation checkpointing, which also keeps only
    one chunk of logits alive at the cost of recomputing the head in backward.
    """
    targets = shifted_targets(labels).reshape(-1)  # (B*T,)
    keep = targets != IGNORE_INDEX
    rows = hidden.reshape(-1, hidden.shape[-1])[keep]  # (N, H)
    targets = targets[keep]  # (N,)
    denominator = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    if is_plain_linear(head):
        need_grads = torch.is_grad_enabled() and (rows.requires_grad or head.weight.requires_grad)
        total = _LinearCrossEntropy.apply(rows, head.weight, targets, chunk_rows, need_grads)
    else:
        total = rows.new_zeros((), dtype=torch.float32)
        for start in range(0, rows.shape[0], chunk_rows):
            part = (rows[start : start + chunk_rows], targets[start : start + chunk_rows])
            if torch.is_grad_enabled():
                total = total + torch.utils.checkpoint.checkpoint(
                    _module_chunk_nll, head, *part, use_reentrant=False
                )
            else:
                total = total + _module_chunk_nll(head, *part)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(total.device)
    return total / denominator
