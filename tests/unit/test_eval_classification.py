import pytest
import torch

from peftlab.evaluation.classification import classification_metrics, label_loglikelihoods, plot_confusion


class BigramModel(torch.nn.Module):
    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)  # [V, V] next-token logits given the current token

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()  # [B, T, V]


class CharTokenizer:
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": ["_xyab".index(c) for c in text]}


# after 'x' the model prefers 'a', after 'y' it prefers 'b'; after 'a'/'b' it prefers 'a' weakly
TABLE = torch.tensor(
    [
        [0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 3.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 3.0],
        [0.0, 0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0, 0.0],
    ]
)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_label_scores_equal_hand_computed_loglikelihoods(batch_size):
    logp = torch.log_softmax(TABLE, dim=-1)
    tok = CharTokenizer()
    prompts, completions = ["x", "yx", "y"], ["a", "bb"]
    scores = label_loglikelihoods(BigramModel(TABLE), tok, prompts, completions, batch_size=batch_size)
    for n, p in enumerate(prompts):
        for k, c in enumerate(completions):
            ids = tok(p + c)["input_ids"]
            start = len(p)
            want = sum(logp[ids[t - 1], ids[t]].item() for t in range(start, len(ids)))
            assert scores[n, k].item() == pytest.approx(want, rel=1e-6)
    assert scores.argmax(1).tolist() == [0, 0, 1]  # the labels the toy model prefers
    normed = label_loglikelihoods(BigramModel(TABLE), tok, prompts, completions, length_normalise=True)
    assert torch.allclose(normed, scores / torch.tensor([1.0, 2.0]))


def test_classification_metrics_equal_hand_computed_values(tmp_path):
    gold = ["pos", "pos", "neg", "neg", "neu"]
    pred = ["pos", "neg", "neg", "neg", "pos"]
    m = classification_metrics(gold, pred, ["pos", "neg", "neu"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["per_class"]["pos"]["precision"] == pytest.approx(1 / 2)
    assert m["per_class"]["pos"]["recall"] == pytest.approx(1 / 2)
    assert m["per_class"]["neg"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["neg"]["recall"] == pytest.approx(1.0)
    f1_neg = 2 * (2 / 3) / (2 / 3 + 1)
    assert m["macro_f1"] == pytest.approx((0.5 + f1_neg + 0.0) / 3)
    plot_confusion(m["confusion_matrix"], m["labels"], tmp_path / "cm.png")
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"


class VirtualTokens(torch.nn.Module):
    """Like peft prompt tuning: logits for k virtual positions come before the inputs' own."""

    def __init__(self, inner: torch.nn.Module, k: int = 3):
        super().__init__()
        self.inner, self.k = inner, k

    def forward(self, input_ids, attention_mask=None):
        logits = self.inner(input_ids).logits  # [B, T, V]
        junk = torch.full((logits.size(0), self.k, logits.size(2)), 5.0)
        junk[..., 0] = 50.0  # would dominate any score it leaked into
        return type("Out", (), {"logits": torch.cat([junk, logits], dim=1)})()  # [B, k + T, V]


def test_virtual_token_positions_are_never_scored():
    from peftlab.evaluation.generation import answer_loss

    tok = CharTokenizer()
    prompts, completions = ["x", "yx", "y"], ["a", "bb"]
    plain = label_loglikelihoods(BigramModel(TABLE), tok, prompts, completions, batch_size=2)
    wrapped = label_loglikelihoods(VirtualTokens(BigramModel(TABLE)), tok, prompts, completions, batch_size=2)
    assert torch.allclose(plain, wrapped)
    ids, answers = [[1, 3], [2]], [[3, 4], [4, 4, 3]]
    want = answer_loss(BigramModel(TABLE), ids, answers, batch_size=2)
    assert answer_loss(VirtualTokens(BigramModel(TABLE)), ids, answers, batch_size=2) == want
