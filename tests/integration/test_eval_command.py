"""`peftlab eval RUN_DIR` reproduces a run's metrics; `peftlab eval --config` scores a base alone;
train() writes forgetting and the side-by-side samples."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import EVAL_TEXT
from peftlab.cli import main
from peftlab.config.loading import validate_config
from peftlab.evaluation.generation import generate_greedy
from peftlab.train.recipe import train


@pytest.fixture()
def general_text(tmp_path):
    path = tmp_path / "general.txt"
    path.write_text(EVAL_TEXT * 3)
    return path


@pytest.mark.parametrize("method", ["lora", "full"])
def test_eval_run_dir_reproduces_the_tuned_metrics_exactly(method, tiny_run_config, general_text, capsys):
    tiny_run_config["eval"]["forgetting_path"] = str(general_text)
    if method == "full":
        tiny_run_config["method"] = {"name": "full"}
        tiny_run_config["train"]["lr"] = 1e-3
    run = train(validate_config(tiny_run_config), progress=False).run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["base_eval_cached"] is False
    capsys.readouterr()

    assert main(["eval", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    result = json.loads((run / "eval.json").read_text())
    assert result["weights"] == ("adapter" if method == "lora" else "model")
    assert result["tuned"] == metrics["tuned"]  # every float bitwise
    assert result["base"] == metrics["base"] and result["base_eval_cached"] is True
    assert "base evaluation: reusing cached result" in out
    assert result["forgetting"] == metrics["forgetting"]
    assert result["tuned"]["perplexity"] != result["base"]["perplexity"]
    assert f"{metrics['tuned']['perplexity']:.3f}" in out and "forgetting (tuned - base CE)" in out
    assert [r["prompt"] for r in result["samples"]] == tiny_run_config["eval"]["sample_prompts"]


def test_train_writes_forgetting_and_samples_for_every_prompt(tiny_run_config, tiny_model_dir, general_text):
    tiny_run_config["eval"]["forgetting_path"] = str(general_text)
    run = train(validate_config(tiny_run_config), progress=False).run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    forgetting = metrics["forgetting"]
    base_ce, tuned_ce = (
        metrics["base"]["general_text"]["mean_nll"],
        metrics["tuned"]["general_text"]["mean_nll"],
    )
    assert forgetting["forgetting"] == tuned_ce - base_ce and forgetting["source"] == str(general_text)
    assert "sample_answers" not in metrics["base"] and "sample_answers" not in metrics["tuned"]

    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    prompts = tiny_run_config["eval"]["sample_prompts"]
    assert [r["prompt"] for r in rows] == prompts
    # each answer is the greedy continuation of that model, recomputed here independently
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), run / "adapter"
    ).eval()
    for row in rows:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for side, model in (("base", base), ("tuned", tuned)):
            new = generate_greedy(model, tokenizer, [ids], 8)[0]
            assert row[side] == tokenizer.decode(new, skip_special_tokens=True).strip()
    md = (run / "samples.md").read_text()
    assert all(f"## {i}. {p}" in md for i, p in enumerate(prompts, 1))
    assert md.count("**base**") == md.count("**tuned**") == len(prompts)


def test_eval_base_model_alone_prints_a_table_and_writes_only_with_out(
    tiny_run_config, tiny_model_dir, general_text, tmp_path, capsys
):
    tiny_run_config["eval"]["forgetting_path"] = str(general_text)
    del tiny_run_config["method"]  # a config for evaluation alone needs no method
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config))
    code = main(
        ["eval", "--model", str(tiny_model_dir), "--config", str(config), "eval.max_new_tokens=4", "--quiet"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "perplexity (token-level, L=16, S=8)" in out and "general-text cross-entropy" in out
    assert not (tmp_path / "runs").exists()

    target = tmp_path / "base-eval.json"
    assert main(["eval", "--config", str(config), "--out", str(target), "--quiet"]) == 0
    result = json.loads(target.read_text())
    assert result["model"] == str(tiny_model_dir) and result["base"]["tokens"] > 0
    assert result["base_eval_cached"] is False  # max_new_tokens differs from the first call
    assert [r["prompt"] for r in result["samples"]] == tiny_run_config["eval"]["sample_prompts"]
    assert "forgetting" in result and "skipped" in result["forgetting"]
