"""Word perplexity, byte perplexity and bits per byte as lm-evaluation-harness defines them for
wikitext, so numbers compare across tokenizers.

Per document: the rolling log-likelihood of its tokens (natural log), the first token predicted from
the EOS prefix token and later tokens in disjoint windows of up to L targets (the harness's
`loglikelihood_rolling` with context_len=1; see `perplexity.rolling_windows`). Summed over documents:
word_perplexity = exp(-sum LL / sum words), words = len(re.split(r"\\s+", text));
byte_perplexity = exp(-sum LL / sum bytes), bytes = UTF-8 length of the text;
bits_per_byte = log2(byte_perplexity).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from peftlab.evaluation.perplexity import rolling_windows, score_tokens


@dataclass
class UnitScores:
    loglikelihood: float  # natural log, summed over documents
    tokens: int
    words: int
    bytes: int
    window: int
    documents: int

    @property
    def word_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.words)

    @property
    def byte_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.bytes)

    @property
    def bits_per_byte(self) -> float:
        return math.log2(self.byte_perplexity)

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "loglikelihood": self.loglikelihood,
            "tokens": self.tokens,
            "words": self.words,
            "bytes": self.bytes,
            "documents": self.documents,
            "window": self.window,
            "word_perplexity": self.word_perplexity,
            "byte_perplexity": self.byte_perplexity,
            "bits_per_byte": self.bits_per_byte,
            "metric": "lm-evaluation-harness rolling loglikelihood per document (prefix EOS, disjoint windows)",
        }


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def score_documents(
    model: torch.nn.Module,
    tokenizer: Any,
    documents: list[str],
    window: int,
    batch_size: int = 4,
    progress: bool = False,
) -> UnitScores:
    """Rolling log-likelihood of each document, and word/byte counts of the original text."""
    prefix = tokenizer.eos_token_id
    if prefix is None:
        raise ValueError("word/byte perplexity needs a tokenizer with an EOS token as the rolling prefix")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix
    ll, tokens, words, n_bytes, n_docs = 0.0, 0, 0, 0, 0
    for doc in documents:
        ids = [prefix, *tokenizer(doc, add_special_tokens=False)["input_ids"]]
        if len(ids) < 2:
            continue  # empty document: nothing to predict (the harness skips it too)
        spans = rolling_windows(len(ids), window)
        scores = score_tokens(
            model, ids, window, window, batch_size=batch_size, pad_id=pad, progress=progress, spans=spans
        )
        ll -= scores.nll_sum
        tokens += scores.tokens
        words += count_words(doc)
        n_bytes += len(doc.encode("utf-8"))
        n_docs += 1
    if n_docs == 0:
        raise ValueError("no non-empty document to score")
    return UnitScores(ll, tokens, words, n_bytes, window, n_docs)
