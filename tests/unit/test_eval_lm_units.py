import itertools
import math
import re

import pytest
import torch

from peftlab.evaluation.lm_units import score_documents
from peftlab.evaluation.perplexity import rolling_windows


class BigramModel(torch.nn.Module):
    """Next-token logits depend on the current token only, so exact values are computable by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)  # [V, V]

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()  # [B, T, V]


class CharTokenizer:
    """One token per character of 'ab é' (ids 1..4), EOS = 0: counts are easy to do by hand."""

    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": ["_ab é".index(c) for c in text]}


TABLE = torch.tensor(
    [
        [0.0, 2.0, 1.0, 0.0, 0.0],
        [0.0, 0.5, 2.0, 1.0, 0.0],
        [1.0, 1.0, 0.0, 2.0, 0.5],
        [0.0, 1.5, 1.0, 0.0, 1.0],
        [0.0, 0.0, 0.0, 2.0, 0.0],
    ]
)


@pytest.mark.parametrize("window", [2, 3, 64])
def test_word_and_byte_perplexity_equal_hand_computed_values(window):
    docs = ["ab ba", "é ab", "b"]
    logp = torch.log_softmax(TABLE, dim=-1)
    tok = CharTokenizer()
    ll = 0.0
    for doc in docs:
        ids = [0, *tok(doc)["input_ids"]]  # EOS prefix predicts the first character
        ll += sum(logp[a, b].item() for a, b in itertools.pairwise(ids))
    words = sum(len(re.split(r"\s+", d)) for d in docs)  # 2 + 2 + 1
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)  # é is 2 bytes: 5 + 5 + 1
    assert (words, n_bytes) == (5, 11)
    scores = score_documents(BigramModel(TABLE), tok, docs, window=window, batch_size=2)
    assert scores.tokens == 5 + 4 + 1
    assert scores.loglikelihood == pytest.approx(ll, rel=1e-6)
    assert scores.word_perplexity == pytest.approx(math.exp(-ll / 5), rel=1e-6)
    assert scores.byte_perplexity == pytest.approx(math.exp(-ll / 11), rel=1e-6)
    assert scores.bits_per_byte == pytest.approx(-ll / 11 / math.log(2), rel=1e-6)


@pytest.mark.parametrize(("n", "window"), [(2, 4), (10, 4), (9, 4), (5, 1), (100, 7)])
def test_rolling_windows_score_each_token_once_with_full_context_at_the_end(n, window):
    spans = rolling_windows(n, window)
    seen = []
    for begin, end, first in spans:
        assert end - begin <= window and first >= begin + 1
        seen.extend(range(first, end + 1))
    assert seen == list(range(1, n))
    begin, end, _ = spans[-1]
    assert end - begin == min(window, n - 1)  # last window right-aligned, as in the harness


def test_rolling_scores_on_a_real_tiny_model_do_not_depend_on_batching(tiny_model, tiny_tokenizer):
    docs = ["the quick brown fox jumps over the lazy dog " * 3, "hello world"]
    one = score_documents(tiny_model, tiny_tokenizer, docs, window=8, batch_size=1)
    many = score_documents(tiny_model, tiny_tokenizer, docs, window=8, batch_size=4)
    assert one.tokens == many.tokens > 0
    assert many.loglikelihood == pytest.approx(one.loglikelihood, rel=1e-5)


def test_suite_reports_word_and_byte_perplexity_beside_token_perplexity(tiny_model, tiny_tokenizer):
    from peftlab.config.sections import EvalConfig
    from peftlab.evaluation.held_out_text import EvalData, evaluate_lm

    text = "the quick brown fox jumps over the lazy dog and runs away"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    out = evaluate_lm(
        tiny_model, tiny_tokenizer, EvalData(ids, "x", [text]), EvalConfig(window=8, stride=4), "b"
    )
    direct = score_documents(tiny_model, tiny_tokenizer, [text], window=8)
    assert out["units"]["window"] == 8 and out["window"] == 8 and out["stride"] == 4
    assert out["units"]["word_perplexity"] == pytest.approx(direct.word_perplexity, rel=1e-6)
    assert out["units"]["words"] == len(text.split())
