import json

import pytest

from peftlab.evaluation.base_vs_tuned import forgetting, write_samples
from peftlab.evaluation.perplexity import LMScores


def test_forgetting_is_tuned_minus_base_cross_entropy():
    # base: 20 nats over 10 tokens = 2.0 per token; tuned: 25 / 10 = 2.5; forgetting = 2.5 - 2.0
    out = forgetting(LMScores(20.0, 10, 3, 8, 4), LMScores(25.0, 10, 2, 8, 4))
    assert out == {
        "base_ce": pytest.approx(2.0),
        "tuned_ce": pytest.approx(2.5),
        "forgetting": pytest.approx(0.5),
        "tokens": 10,
        "window": 8,
        "stride": 4,
    }
    # a tuned model that got better on the general text: negative forgetting (12 / 8 - 2.0)
    assert forgetting(LMScores(16.0, 8, 0, 8, 8), LMScores(12.0, 8, 0, 8, 8))["forgetting"] == pytest.approx(
        -0.5
    )
    for tuned in (LMScores(25.0, 11, 2, 8, 4), LMScores(25.0, 10, 2, 16, 4), LMScores(25.0, 10, 2, 8, 8)):
        with pytest.raises(ValueError, match="same tokens"):
            forgetting(LMScores(20.0, 10, 3, 8, 4), tuned)


def test_samples_are_written_as_jsonl_and_markdown(tmp_path):
    write_samples(tmp_path, ["Hi?", "Why?"], ["b1", "b2"], ["t1", "t2"])
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert rows == [
        {"prompt": "Hi?", "base": "b1", "tuned": "t1"},
        {"prompt": "Why?", "base": "b2", "tuned": "t2"},
    ]
    md = (tmp_path / "samples.md").read_text()
    assert "## 2. Why?" in md and md.index("b2") < md.index("t2")
