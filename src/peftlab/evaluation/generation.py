"""Greedy generation for instruction following, batched with left padding.

Left padding keeps every prompt's last token at the same position so that one `generate` call
continues all rows; the attention mask hides the pads and position ids follow the mask, so a row's
output equals what the prompt alone gives.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def instruction_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], str]:
    """Prompt ids (all messages before the last assistant turn, chat template with the generation
    prompt) and the reference answer (the last assistant content)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("an instruction record needs an assistant message as the reference")
    ids = tokenizer.apply_chat_template(messages[:last], add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids), messages[last]["content"]


@torch.no_grad()
def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 8,
) -> list[list[int]]:
    """New token ids per prompt (greedy, at most max_new_tokens, cut after the first EOS)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        width = max(len(p) for p in batch)
        inputs = torch.full((len(batch), width), pad, dtype=torch.long)  # [B, T], pads on the left
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):
            inputs[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        generated = model.generate(
            input_ids=inputs.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )[:, width:].cpu()  # [B, <= max_new_tokens]
        for row in generated.tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos) + 1]
            out.append(row)
    model.train(was_training)
    return out


@torch.no_grad()
def answer_loss(
    model: Any, prompts: list[list[int]], answers: list[list[int]], pad_id: int = 0, batch_size: int = 8
) -> dict[str, float | int]:
    """Mean NLL and perplexity of the reference answers given their prompts: only answer tokens are
    scored (prompt and padding never count)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum, n_tokens = 0.0, 0
    for i in range(0, len(prompts), batch_size):
        seqs = [p + a for p, a in zip(prompts[i : i + batch_size], answers[i : i + batch_size], strict=True)]
        width = max(len(s) for s in seqs)
        inputs = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, T]
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, (s, p) in enumerate(zip(seqs, prompts[i : i + batch_size], strict=True)):
            inputs[row, : len(s)] = torch.tensor(s)
            labels[row, len(p) : len(s)] = torch.tensor(s[len(p) :])
            mask[row, : len(s)] = 1
        logits = model(input_ids=inputs.to(device), attention_mask=mask.to(device)).logits
        logits = logits[:, -width:].float()  # [B, T, V]; virtual tokens (prompt tuning) come first
        shifted = labels[:, 1:].to(device)  # [B, T-1]: position t predicts token t+1
        nll_sum += torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)),
            shifted.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        ).item()
        n_tokens += int((shifted != -100).sum())
    model.train(was_training)
    mean = nll_sum / max(n_tokens, 1)
    return {"answer_nll": mean, "answer_perplexity": math.exp(mean), "answer_tokens": n_tokens}
