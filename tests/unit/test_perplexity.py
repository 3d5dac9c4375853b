import itertools
import math

import pytest
import torch

from peftlab.evaluation.perplexity import score_tokens, sliding_windows


class BigramModel(torch.nn.Module):
    """A hand-written model whose next-token distribution depends on the current token only, so the
    exact perplexity can be computed by hand whatever the window."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)  # [V, V] logits of next token given current

    def forward(self, input_ids, attention_mask=None):
        class Out:
            pass

        out = Out()
        out.logits = self.table[input_ids]  # [B, T, V]
        return out


def test_perplexity_equals_hand_computed_value():
    table = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 1.0, 1.0]])
    ids = [0, 1, 2, 2, 0, 0, 1]
    logp = torch.log_softmax(table, dim=-1)
    nll = -sum(logp[a, b].item() for a, b in itertools.pairwise(ids))
    hits = sum(int(table[a].argmax().item() == b) for a, b in itertools.pairwise(ids))
    for window, stride in [(3, 3), (3, 1), (4, 2), (16, 16)]:
        scores = score_tokens(BigramModel(table), ids, window, stride, batch_size=2, progress=False)
        assert scores.tokens == 6
        assert scores.nll_sum == pytest.approx(nll, rel=1e-6)
        assert scores.perplexity == pytest.approx(math.exp(nll / 6), rel=1e-6)
        assert scores.correct == hits


@pytest.mark.parametrize(
    ("n", "window", "stride"),
    [(10, 4, 4), (10, 4, 1), (10, 4, 3), (5, 8, 8), (5, 8, 2), (2, 2, 1), (100, 7, 5)],
)
def test_every_target_is_scored_exactly_once(n, window, stride):
    seen = []
    for begin, end, first in sliding_windows(n, window, stride):
        assert end - begin <= window
        assert first >= begin + 1  # a target is always predicted from context inside its window
        seen.extend(range(first, end + 1))
    assert seen == list(range(1, n))


def test_first_window_is_fully_scored_and_later_context_is_at_least_window_minus_stride():
    spans = sliding_windows(100, 8, 3)
    assert spans[0] == (0, 8, 1)
    for begin, _, first in spans[1:]:
        assert first - 1 - begin >= 8 - 3 - 1


def test_padding_in_batched_windows_does_not_count(tiny_model):
    ids = list(range(5, 5 + 23))
    one = score_tokens(tiny_model, ids, window=8, stride=8, batch_size=1, progress=False)
    batched = score_tokens(tiny_model, ids, window=8, stride=8, batch_size=3, progress=False)
    assert one.tokens == batched.tokens == 22
    assert batched.nll_sum == pytest.approx(one.nll_sum, rel=1e-5)
    assert batched.correct == one.correct


def test_logits_only_for_scored_positions_give_the_same_scores(tiny_model, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from peftlab.evaluation import perplexity

    ids = [5 + (i * 7) % 200 for i in range(61)]
    assert perplexity.accepts_logits_to_keep(tiny_model)
    assert not perplexity.accepts_logits_to_keep(BigramModel(torch.zeros(3, 3)))
    calls = []
    forward = tiny_model.forward

    def spy(*args, logits_to_keep=0, **kwargs):
        calls.append(logits_to_keep)
        return forward(*args, logits_to_keep=logits_to_keep, **kwargs)

    monkeypatch.setattr(tiny_model, "forward", spy)
    trimmed = score_tokens(tiny_model, ids, window=16, stride=4, batch_size=3, progress=False)
    # the first batch holds the fully scored first window; later windows score their last S targets
    assert calls and max(calls) == 16 and min(calls) == 4
    monkeypatch.setattr(perplexity, "accepts_logits_to_keep", lambda model: False)
    full = score_tokens(tiny_model, ids, window=16, stride=4, batch_size=3, progress=False)
    assert trimmed.tokens == full.tokens == 60 and trimmed.correct == full.correct
    assert trimmed.nll_sum == pytest.approx(full.nll_sum, rel=1e-6)

    monkeypatch.undo()
    wrapped = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert perplexity.accepts_logits_to_keep(wrapped)


def test_linear_nll_and_hits_equal_cross_entropy_and_argmax():
    from peftlab.model.chunked_loss import linear_nll_and_hits

    generator = torch.Generator().manual_seed(0)
    rows, weight = torch.randn(37, 8, generator=generator), torch.randn(50, 8, generator=generator)
    targets = torch.randint(0, 50, (37,), generator=generator)
    targets[:5] = (rows[:5] @ weight.T).argmax(-1)  # some hits for sure
    logits = rows @ weight.T
    nll, hits = linear_nll_and_hits(rows, weight, targets, chunk_rows=10)  # 4 chunks, the last short
    assert nll == pytest.approx(
        torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item(), rel=1e-6
    )
    assert hits == int((logits.argmax(-1) == targets).sum()) >= 5


def test_the_hidden_state_path_equals_the_models_own_logits(tiny_model, monkeypatch):
    from peftlab.evaluation import perplexity

    ids = [5 + (i * 11) % 250 for i in range(70)]
    calls = []
    linear = perplexity.linear_nll_and_hits
    monkeypatch.setattr(perplexity, "linear_nll_and_hits", lambda *a, **k: calls.append(1) or linear(*a, **k))
    chunked = score_tokens(tiny_model, ids, window=16, stride=8, batch_size=2, progress=False)
    assert len(calls) == 4  # every batch: 8 windows in batches of 2
    assert tiny_model.get_output_embeddings() is tiny_model.lm_head  # the head is back
    monkeypatch.setattr(perplexity, "_plain_head", lambda model: None)
    own = score_tokens(tiny_model, ids, window=16, stride=8, batch_size=2, progress=False)
    assert chunked.tokens == own.tokens == 69 and chunked.correct == own.correct
    assert chunked.nll_sum == pytest.approx(own.nll_sum, rel=1e-6)


def test_a_model_that_scales_its_logits_is_scored_by_its_own_logits(tiny_model):
    """Logits that are more than head(hidden) (Cohere scales them, Gemma 2 soft-caps them) are
    caught on the first batch, and every batch is scored from the model's own logits."""
    forward = tiny_model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out

    tiny_model.forward = scaled
    ids = [5 + (i * 11) % 250 for i in range(40)]
    scores = score_tokens(tiny_model, ids, window=8, stride=8, batch_size=2, progress=False)
    # with S = L every window is scored in full and starts afresh
    expected = 0.0
    for begin, end, _ in sliding_windows(len(ids), 8, 8):
        with torch.no_grad():
            window_logits = 3.0 * forward(input_ids=torch.tensor([ids[begin:end]])).logits[0]
        targets = torch.tensor(ids[begin + 1 : end + 1])
        expected += torch.nn.functional.cross_entropy(window_logits, targets, reduction="sum").item()
    assert scores.tokens == 39
    assert scores.nll_sum == pytest.approx(expected, rel=1e-5)
