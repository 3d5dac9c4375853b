"""Checkpoint rotation (newest N plus the best) and the evaluation settings given to the Trainer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from peftlab.config.loading import validate_config
from peftlab.config.sections import TrainConfig
from peftlab.errors import ConfigError
from peftlab.train.arguments import evaluation_arguments
from peftlab.train.callbacks import KeepNewestAndBest


def rotate(tmp_path, steps, global_step, limit, best):
    for step in steps:
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name: left alone
    state = SimpleNamespace(
        global_step=global_step,
        is_world_process_zero=True,
        best_model_checkpoint=str(tmp_path / f"checkpoint-{best}") if best else None,
    )
    KeepNewestAndBest(limit).on_save(SimpleNamespace(output_dir=str(tmp_path)), state, None)
    return sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    ("steps", "global_step", "limit", "best", "kept"),
    [
        ([2, 4, 6, 8], 8, 2, 2, [2, 6, 8]),  # transformers would keep only 2 and 8
        ([2, 4, 6], 6, 1, 2, [2, 6]),
        ([2, 4, 6], 6, 1, 6, [6]),
        ([2, 4, 6], 6, 2, None, [4, 6]),  # no validation: the newest N
        ([2, 4, 6], 6, None, 2, [2, 4, 6]),  # no limit
        ([2, 4, 5, 6], 5, 1, 2, [2, 5]),  # resumed from 4 and saved at 5: the stale 6 goes
    ],
)
def test_rotation_keeps_the_newest_n_plus_the_best(tmp_path, steps, global_step, limit, best, kept):
    names = rotate(tmp_path, steps, global_step, limit, best)
    assert names == sorted([f"checkpoint-{s}" for s in kept] + ["checkpoint-x"])


def test_evaluation_arguments():
    assert evaluation_arguments(TrainConfig(save_steps=5), False) == {
        "save_total_limit": None,
        "eval_strategy": "no",
    }
    at_saves = evaluation_arguments(TrainConfig(save_steps=5, batch_size=3), True)
    assert at_saves["eval_strategy"] == "steps" and at_saves["eval_steps"] == 5
    assert at_saves["per_device_eval_batch_size"] == 3 and at_saves["prediction_loss_only"] is True
    assert at_saves["metric_for_best_model"] == "eval_loss" and at_saves["greater_is_better"] is False
    assert at_saves["save_total_limit"] is None  # rotation is KeepNewestAndBest's
    assert evaluation_arguments(TrainConfig(), True)["eval_strategy"] == "epoch"
    assert evaluation_arguments(TrainConfig(eval_steps=3), True)["eval_steps"] == 3


@pytest.mark.parametrize(
    ("train", "data", "message"),
    [
        ({"eval_steps": 3, "save_steps": 2}, {}, "train.eval_steps (3) must equal train.save_steps (2)"),
        ({"eval_steps": 3}, {"validation_fraction": 0}, "train.eval_steps needs a validation set"),
    ],
)
def test_eval_steps_rules(train, data, message):
    raw = {"data": {"train_path": "x.txt", **data}, "method": {"name": "lora"}, "train": train}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(raw)
    ok = {**raw, "train": {**train, "save_steps": train["eval_steps"]}, "data": {"train_path": "x.txt"}}
    assert validate_config(ok).train.eval_steps == train["eval_steps"]
