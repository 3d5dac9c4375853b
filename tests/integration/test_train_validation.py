"""In-training validation on the tiny model: the best checkpoint survives rotation beside the newest,
and the padding waste in metrics.json is that of the batches actually trained on."""

from __future__ import annotations

import json

import pytest

from peftlab.config.loading import validate_config
from peftlab.data.task import build_task_data
from peftlab.train.recipe import train


def test_save_total_limit_one_keeps_the_newest_and_the_best(tiny_run_config, tmp_path):
    # Constructed so that validation loss rises after the first save: train on one repeated word,
    # validate on another; the more the model learns ' the', the worse it predicts ' dog'.
    (tmp_path / "same.raw").write_text(" the" * 400)
    (tmp_path / "other.raw").write_text(" dog" * 100)
    tiny_run_config["data"] = {
        "train_path": str(tmp_path / "same.raw"),
        "validation_path": str(tmp_path / "other.raw"),
        "block_size": 32,
    }
    tiny_run_config["train"].update(
        max_steps=6, save_steps=2, save_total_limit=1, lr=0.05, lr_scheduler="constant"
    )
    tiny_run_config["eval"]["enabled"] = False
    run = train(validate_config(tiny_run_config), progress=False).run_dir

    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in lines if "eval_loss" in r}
    assert sorted(evals) == [2, 4, 6]
    assert evals[2] < evals[4] < evals[6], f"the construction must make step 2 the best: {evals}"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-6"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_checkpoint"] == "checkpoints/checkpoint-2"
    assert metrics["best_eval_loss"] == evals[2] and metrics["final_eval_loss"] == evals[6]
    assert metrics["eval_count"] == 3 and metrics["eval_seconds"] > 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data"]["validation_source"].startswith("data.validation_path")


CHAT = [
    {
        "conversation_id": f"c{i}",
        "messages": [
            {"role": "user", "content": "Name a fox."},
            {"role": "assistant", "content": "The quick brown fox" + " jumps" * (i % 5)},
        ],
    }
    for i in range(12)
]


@pytest.mark.parametrize("all_rows_per_batch", [False, True])
def test_padding_waste_is_that_of_the_trained_batches(
    all_rows_per_batch, tiny_run_config, tiny_tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    tiny_run_config["data"] = {
        "kind": "chat",
        "train_path": str(path),
        "group_key": "conversation_id",
        "test_fraction": 0.2,
        "validation_fraction": 0.2,  # its batches are evaluated after each epoch and must not count
        "packing": False,
        "max_seq_len": 64,
    }
    tiny_run_config["eval"]["enabled"] = False
    cfg = validate_config(tiny_run_config)
    lengths = [
        len(ids) for ids in build_task_data(cfg.data, tiny_tokenizer, 0).train_dataset.blocks.input_ids
    ]  # type: ignore[attr-defined]
    assert len(set(lengths)) > 1, "rows of different lengths, or there is nothing to pad"
    if all_rows_per_batch:  # one batch per epoch holding every row, two epochs: countable by hand
        cfg.train.batch_size, cfg.train.max_steps = len(lengths), 2
        expected = {
            "real_tokens": 2 * sum(lengths),
            "pad_tokens": 2 * (len(lengths) * max(lengths) - sum(lengths)),
        }
    else:  # one row per batch, one epoch: every row once and no padding at all
        cfg.train.batch_size, cfg.train.max_steps, cfg.train.epochs = 1, None, 1.0
        expected = {"real_tokens": sum(lengths), "pad_tokens": 0}
    run = train(cfg, progress=False).run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    total = expected["real_tokens"] + expected["pad_tokens"]
    assert metrics["padding"] == {**expected, "padding_waste": pytest.approx(expected["pad_tokens"] / total)}
    assert metrics["padding_waste"] == metrics["padding"]["padding_waste"]
    assert metrics["eval_count"] >= 1  # validation ran, and its batches were left out
    bound = json.loads((run / "manifest.json").read_text())["data"]["padding_waste_bound"]
    assert bound == pytest.approx(1 - sum(lengths) / (len(lengths) * max(lengths)))
