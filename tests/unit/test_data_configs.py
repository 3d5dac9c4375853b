"""The ready data configs validate, and their data builds with the tiny tokenizer (no model)."""

from pathlib import Path

import pytest

from conftest import REPO, SHARED_DATA
from peftlab.config.loading import load_config
from peftlab.data.task import build_task_data
from peftlab.evaluation.inputs import build_eval_inputs

CONFIGS = ["wikitext-lm", "alpaca-instruct", "oasst1-chat", "sst2-classification"]


@pytest.mark.parametrize("name", CONFIGS)
def test_ready_config_builds_its_data(name, tiny_tokenizer, tmp_path, monkeypatch):
    path = REPO / "configs" / f"{name}.yaml"
    assert path.read_text().startswith(f"# peftlab train configs/{name}.yaml")
    if not SHARED_DATA.is_dir():
        pytest.skip("shared data not present")
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    cfg = load_config(path)
    data = build_task_data(cfg.data, tiny_tokenizer)
    assert len(data.train_dataset) > 0
    if cfg.data.kind != "text":
        assert data.test_records and data.stats["train_examples"] > 0
    if name == "oasst1-chat":
        assert data.stats["trailing_user_turns_cut"] > 0 and data.stats["train_groups"] > 0
    if name == "sst2-classification":
        assert data.label_names == ["negative", "positive"]
        assert {r["label"] for r in data.test_records} == {"negative", "positive"}
    assert Path(path).is_file()
    # and its evaluation inputs: every config is evaluated (base and tuned) when trained
    assert cfg.eval.enabled
    inputs = build_eval_inputs(cfg, tiny_tokenizer, data)
    assert inputs.general is not None and len(inputs.general.ids) == cfg.eval.forgetting_max_tokens
    assert len(inputs.sample_ids) == 10
    if cfg.data.kind == "chat":
        assert 0 < len(inputs.chat) == min(cfg.eval.max_examples, len(data.test_records))
    if cfg.data.kind == "classification":
        assert len(inputs.class_prompts) == min(cfg.eval.max_examples, len(data.test_records)) == 200
