"""The evaluation that every run applies to the base and the tuned model, with the same code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from peftlab.config.sections import EvalConfig
from peftlab.evaluation.lm_units import score_documents
from peftlab.evaluation.perplexity import score_tokens


@dataclass
class EvalData:
    """What the evaluation scores: a held-out token stream and where it came from."""

    ids: list[int]
    source: str
    documents: list[str] | None = None  # original text(s) for word/byte perplexity (lm_units)


def evaluate_lm(
    model: torch.nn.Module, tokenizer: Any, data: EvalData, cfg: EvalConfig, label: str, progress: bool = True
) -> dict[str, Any]:
    scores = score_tokens(
        model,
        data.ids,
        window=cfg.window,
        stride=cfg.stride,
        batch_size=cfg.batch_size,
        pad_id=tokenizer.pad_token_id or 0,
        desc=f"eval {label}",
        progress=progress,
    )
    out: dict[str, Any] = {
        **scores.as_dict(),
        "source": data.source,
        "metric": "token-level perplexity, sliding window",
    }
    if data.documents:
        units = score_documents(
            model, tokenizer, data.documents, window=cfg.window, batch_size=cfg.batch_size
        )
        out["units"] = units.as_dict()  # word/byte perplexity, bits per byte (harness definition)
    return out
