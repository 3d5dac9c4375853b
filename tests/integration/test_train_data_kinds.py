"""train() on the tiny model for the chat and classification kinds: the data builder feeds it."""

import json

import pytest

from peftlab.config.loading import validate_config
from peftlab.train.recipe import train

CHAT = [
    {
        "conversation_id": f"c{i % 6}",
        "messages": [
            {"role": "prompter", "content": "Name a fox."},
            {"role": "assistant", "content": f"The quick brown fox {i}."},
            {"role": "prompter", "content": "And a dog?"},
            {"role": "assistant", "content": "The lazy dog sat on the log."},
        ],
    }
    for i in range(24)
]


@pytest.mark.parametrize("kind", ["chat", "classification"])
def test_train_on_structured_data(kind, tiny_run_config, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    if kind == "chat":
        path = tmp_path / "chat.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
        data = {
            "kind": "chat",
            "train_path": str(path),
            "group_key": "conversation_id",
            "test_fraction": 0.34,
        }
    else:
        path = tmp_path / "cls.tsv"
        path.write_text("".join(f"the dog sat {i}\t{i % 2}\n" for i in range(40)))
        data = {
            "kind": "classification",
            "train_path": str(path),
            "header": False,
            "label_names": ["negative", "positive"],
            "test_fraction": 0.2,
        }
    raw = {**tiny_run_config, "data": {**data, "max_seq_len": 64}}
    raw["eval"] = {**raw["eval"], "max_examples": 4, "forgetting_path": None}
    result = train(validate_config(raw), progress=False)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    stats = manifest["data"]
    assert stats["kind"] == kind and stats["train_examples"] > 0 and stats["test_records"] > 0
    assert 0 <= stats["padding_waste_bound"] < 1 and stats["validation_records"] > 0
    if kind == "chat":
        assert stats["train_groups"] + stats["validation_groups"] + stats["test_groups"] == 6
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["train_steps"] == 6 and metrics["final_logged_loss"] > 0
    # the evaluation of the data kind, for base and tuned alike
    assert metrics["forgetting"] == {"skipped": "eval.forgetting_path is null"}
    assert (result.run_dir / "samples.jsonl").is_file()
    for side in ("base", "tuned"):
        assert "perplexity" not in metrics[side]  # no data.eval_path: no held-out text to score
        if kind == "chat":
            gen = metrics[side]["generation"]
            assert gen["examples"] == 4 and gen["answer_tokens"] > 0 and gen["answer_nll"] > 0
            assert gen["prompts_cut_left"] == 4  # two turns of context do not fit max_seq_len=64
        else:
            cls = metrics[side]["classification"]
            assert sum(map(sum, cls["confusion_matrix"])) == 4 and 0 <= cls["macro_f1"] <= 1
            assert (result.run_dir / "plots" / f"confusion_{side}.png").stat().st_size > 1000
