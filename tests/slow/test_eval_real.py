"""peftlab's sliding-window perplexity on the real SmolLM2-135M against the transformers
perplexity-guide loop, written here independently.

Both score every token x_1..x_{N-1} exactly once, but the windows differ by one position: peftlab's
window at b feeds x_b..x_{e-1} and predicts x_{b+1}..x_e (so with S = L no token is skipped), while
the guide feeds x_b..x_{e-1} and scores only targets inside it, x_{b+1}..x_{e-1}, leaving x_e to the
next window. So a token's context can be one token longer or shorter in one loop than in the other;
with S < L every scored token still sees >= L-S tokens of context in both, so the two perplexities
agree closely (within 0.1%) but not bitwise.
"""

import math

import pytest
import torch

from conftest import SHARED_DATA
from peftlab.config.sections import ModelConfig
from peftlab.evaluation.perplexity import score_tokens
from peftlab.model.loading import load_model, load_tokenizer, resolve_source

pytestmark = pytest.mark.slow
N_TOKENS = 4096  # keeps the test near a minute on 2 CPU cores


def guide_perplexity(model, ids: torch.Tensor, max_length: int, stride: int) -> float:
    """The loop of the transformers perplexity guide (huggingface.co/docs/transformers/perplexity)."""
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        # the model shifts labels left by one, so label 0 never counts; the guide subtracts 1 for it
        # even when label 0 is already masked (every window after the first), which miscounts by one
        # token per window; count the labels the loss really averaged over instead
        num_valid = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss.item() * num_valid
        n_tokens += num_valid
        prev_end = end
        if end == seq_len:
            break
    assert n_tokens == seq_len - 1
    return math.exp(nll_sum / n_tokens)


def test_sliding_window_perplexity_matches_the_transformers_guide_loop():
    source = resolve_source(ModelConfig())
    tokenizer = load_tokenizer(source, ModelConfig())
    model = load_model(source, ModelConfig(), torch.device("cpu"), torch.float32)
    text = (SHARED_DATA / "wikitext-2-raw-v1" / "wiki.test.raw").read_text(encoding="utf-8")[:40_000]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:N_TOKENS]
    assert len(ids) == N_TOKENS
    ours = score_tokens(model, ids, window=2048, stride=512, batch_size=2, progress=False)
    guide = guide_perplexity(model, torch.tensor([ids]), max_length=2048, stride=512)
    non_overlapping = score_tokens(model, ids, window=2048, stride=2048, batch_size=2, progress=False)
    print(
        f"\nSmolLM2-135M-Instruct, wikitext-2 test first {N_TOKENS} tokens: peftlab ppl {ours.perplexity:.4f} "
        f"(L=2048, S=512), guide {guide:.4f} (L=2048, S=512), non-overlapping {non_overlapping.perplexity:.4f} "
        f"(L=2048, S=2048)"
    )
    assert ours.tokens == N_TOKENS - 1
    assert ours.perplexity == pytest.approx(guide, rel=1e-3)
    assert non_overlapping.perplexity > ours.perplexity  # less context on average -> higher perplexity
