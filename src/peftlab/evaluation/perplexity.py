"""Perplexity and token accuracy with a sliding window; every predicted token is scored once.

Definition: the token stream x_0..x_{N-1} has N-1 predicted tokens (x_0 has no context). Windows
start at 0, S, 2S, ...; a window feeds up to L tokens x_b..x_{e-1} and its logits predict
x_{b+1}..x_e. Targets that an earlier window already scored are masked, so each token counts once,
the first window is fully scored, and with S < L every later target sees at least L-S tokens of
context. Perplexity = exp(sum NLL / tokens scored); padding never counts.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from peftlab.data.class_rows import right_pad
from peftlab.model.chunked_loss import linear_nll_and_hits
from peftlab.model.structure import is_plain_linear, output_head

IGNORE_INDEX = -100


@dataclass
class LMScores:
    nll_sum: float  # natural-log negative log-likelihood summed over scored tokens
    tokens: int  # tokens scored
    correct: int  # scored tokens whose target has the largest logit (the argmax prediction)
    window: int
    stride: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def token_accuracy(self) -> float:
        return self.correct / self.tokens

    def as_dict(self) -> dict[str, float | int]:
        return {
            **asdict(self),
            "mean_nll": self.mean_nll,
            "perplexity": self.perplexity,
            "token_accuracy": self.token_accuracy,
        }


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window: inputs ids[begin:end] predict ids[begin+1:end+1];
    targets at positions >= first_scored (absolute) are scored in this window."""
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window], got stride={stride}, window={window}")
    spans = []
    last_target = n_tokens - 1  # index of the last token, the last one predicted
    scored_until = 1  # targets at positions < scored_until are already scored (x_0 never is)
    begin = 0
    while scored_until <= last_target:
        end = min(begin + window, last_target)  # inputs ids[begin:end], targets ids[begin+1:end+1]
        spans.append((begin, end, scored_until))
        scored_until = end + 1
        begin += stride
    return spans


def rolling_windows(n_tokens: int, window: int) -> list[tuple[int, int, int]]:
    """lm-evaluation-harness's rolling windows (get_rolling_token_windows, context_len=1) in the
    (begin, end, first_scored) form of `sliding_windows`: disjoint targets of up to L tokens, and the
    last window right-aligned so that it sees a full L tokens of context. Callers put the prefix
    token (EOS) at position 0 so the document's first token is scored too."""
    spans = []
    last_target = n_tokens - 1
    scored_until = 1
    while scored_until <= last_target:
        end = min(scored_until - 1 + window, last_target)  # targets scored_until..end
        begin = max(0, end - window)
        spans.append((begin, end, scored_until))
        scored_until = end + 1
    return spans


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """True when model(..., logits_to_keep=k) reaches a transformers causal LM (directly, or through
    a peft wrapper that passes keyword arguments on to its base model)."""

    def params(m: Any) -> dict[str, inspect.Parameter]:
        try:
            return dict(inspect.signature(m.forward).parameters)
        except (TypeError, ValueError, AttributeError):
            return {}

    own = params(model)
    if "logits_to_keep" in own:
        return True
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else None
    passes_on = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own.values())
    return base is not None and base is not model and passes_on and "logits_to_keep" in params(base)


def _window_batch(
    batch: list[tuple[int, int, int]], tokens: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, attention mask), each (B, T) right-padded, for a batch of window spans."""
    inputs, mask = right_pad([tokens[begin:end].tolist() for begin, end, _ in batch], pad_id)  # [B, T]
    target_rows = []
    for begin, end, first in batch:
        row = tokens[begin + 1 : end + 1].clone()
        row[: first - (begin + 1)] = IGNORE_INDEX  # already scored by an earlier window
        target_rows.append(row.tolist())
    targets, _ = right_pad(target_rows, IGNORE_INDEX)  # [B, T]
    return inputs, targets, mask


@contextlib.contextmanager
def _hidden_states_as_logits(model: Any, head: torch.nn.Module) -> Iterator[None]:
    """The model's forward returns its final hidden states where its logits would be (the output
    head swapped for an identity), so that `linear_nll_and_hits` can apply the head a chunk at a
    time; the head is put back afterwards."""
    model.set_output_embeddings(torch.nn.Identity())
    try:
        yield
    finally:
        model.set_output_embeddings(head)


def _plain_head(model: Any) -> torch.nn.Linear | None:
    head = output_head(model)
    return head if is_plain_linear(head) and hasattr(model, "set_output_embeddings") else None


@torch.no_grad()
def score_tokens(
    model: torch.nn.Module,
    ids: list[int],
    window: int,
    stride: int,
    batch_size: int = 4,
    pad_id: int = 0,
    progress: bool = True,
    desc: str = "perplexity",
    spans: list[tuple[int, int, int]] | None = None,
) -> LMScores:
    """Sum NLL and argmax hits over every predicted token of `ids`, windows batched.

    With a plain linear output head the model returns its final hidden states and the head and
    softmax run a chunk of rows at a time (model/chunked_loss.py's kernel), so the (tokens x vocabulary) logits
    never exist: 400 MB per batch of 4 x 512 for SmolLM2, gigabytes for a 128k vocabulary; the
    head's share of the time drops ~10% on this CPU (1.30 s against 1.44 s for 2,048 rows). The
    first batch is also scored from the model's own logits, and a model whose logits are more than
    its head's output (scaled or soft-capped) is scored from its own logits throughout."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if spans is None:
        spans = sliding_windows(len(ids), window, stride)
    tokens = torch.tensor(ids, dtype=torch.long)
    trims_logits = accepts_logits_to_keep(model)
    head = _plain_head(model)
    nll_sum, scored, correct = 0.0, 0, 0
    batches = [spans[i : i + batch_size] for i in range(0, len(spans), batch_size)]
    for index, batch in enumerate(tqdm(batches, desc=desc, disable=not progress, unit="batch", leave=False)):
        inputs, targets, mask = _window_batch(batch, tokens, pad_id)
        # Only positions that predict a target scored in this batch need logits; they are the last
        # `keep` of every row (targets already scored lie at the start of a window). Asking the
        # model for those alone skips most of the LM head, the softmax and the argmax when S < L.
        keep = inputs.shape[1] - min(first - begin - 1 for begin, _, first in batch)
        targets = targets[:, -keep:].to(device)  # [B, keep]
        valid = targets != IGNORE_INDEX
        forward = {"input_ids": inputs.to(device), "attention_mask": mask.to(device)}
        if trims_logits:
            forward["logits_to_keep"] = keep
        if head is not None:
            with _hidden_states_as_logits(model, head):
                # a model that ignores logits_to_keep (or prepends virtual tokens) returns more
                # positions; the real ones are always last
                hidden = model(**forward).logits[:, -keep:]  # [B, keep, H]
            nll, hits = linear_nll_and_hits(hidden[valid], head.weight, targets[valid])
        if head is None or index == 0:
            logits = model(**forward).logits[:, -keep:].float()  # [B, keep, V]
            own_nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            ).item()
            own_hits = int(((logits.argmax(-1) == targets) & valid).sum())
            if head is not None and not math.isclose(nll, own_nll, rel_tol=1e-4):
                head = None  # logits are not just head(hidden): the model's own logits from here on
            nll, hits = own_nll, own_hits
        nll_sum += nll
        scored += int(valid.sum())
        correct += hits
    model.train(was_training)
    assert scored == len(ids) - 1, f"scored {scored} tokens, expected {len(ids) - 1}"
    return LMScores(nll_sum, scored, correct, window, stride)
