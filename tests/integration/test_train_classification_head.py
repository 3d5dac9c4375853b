"""classification_head end to end on the tiny model: base scored by label log-likelihood, tuned by its
head, the same metrics for both; `peftlab eval RUN_DIR` rebuilds the head model and reproduces them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

from conftest import EVAL_TEXT
from peftlab.cli import main
from peftlab.config.loading import validate_config
from peftlab.model.structure import NO_LM_HEAD
from peftlab.train.recipe import train

ANIMALS = ["cat", "dog", "fox"]  # the label is the animal named in the text: separable by one word


def write_records(path: Path, n: int) -> Path:
    rows = [{"text": f"The {ANIMALS[i % 3]} sat on the mat {i}.", "label": ANIMALS[i % 3]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def head_config(tiny_run_config: dict[str, Any], tmp_path: Path, **train: Any) -> dict[str, Any]:
    raw = dict(tiny_run_config)
    raw["data"] = {
        "kind": "classification",
        "train_path": str(write_records(tmp_path / "animals.jsonl", 48)),
        "test_fraction": 0.25,
        "max_seq_len": 32,
    }
    raw["method"] = {
        "name": "classification_head",
        "r": 4,
        "alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
    }
    raw["train"] = {**raw["train"], **train}
    raw["eval"] = {**raw["eval"], "max_examples": 12}
    return raw


def test_head_run_scores_both_sides_and_eval_reproduces_it(tiny_run_config, tmp_path, capsys):
    general = tmp_path / "general.txt"
    general.write_text(EVAL_TEXT * 3)
    raw = head_config(tiny_run_config, tmp_path)
    raw["eval"]["forgetting_path"] = str(general)  # present, so its skip on the tuned side is visible
    run = train(validate_config(raw), progress=False).run_dir

    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    stats = manifest["data"]
    assert stats["head"] == "sequence_classification" and stats["packing"] is False
    assert stats["label_names"] == ANIMALS and stats["train_examples"] == stats["train_blocks"] > 0
    assert 0 < stats["padding_waste_bound"] < 1  # the numbers 0..47 make prompts of unequal length

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_steps"] == 6 and metrics["loss_impl"] == "standard"
    assert metrics["padding"]["real_tokens"] > 0 and metrics["padding"]["pad_tokens"] > 0
    base, tuned = metrics["base"]["classification"], metrics["tuned"]["classification"]
    assert base["scoring"] == "label log-likelihood (sum)"
    assert tuned["scoring"] == "classification head (argmax of class logits)"
    for side in (base, tuned):
        assert side["labels"] == ANIMALS and side["examples"] == 12
        assert sum(map(sum, side["confusion_matrix"])) == 12 and set(side["per_class"]) == set(ANIMALS)
    # the base is a causal LM and scores everything; the head model says what it cannot score
    assert "mean_nll" in metrics["base"]["general_text"]
    assert metrics["tuned"]["general_text"] == {"skipped": NO_LM_HEAD}
    assert metrics["tuned"]["skipped"] == {"general_text": NO_LM_HEAD, "sample_answers": NO_LM_HEAD}
    assert metrics["forgetting"] == {"skipped": NO_LM_HEAD}
    assert not (run / "samples.jsonl").exists()
    for side in ("base", "tuned"):
        assert (run / "plots" / f"confusion_{side}.png").stat().st_size > 1000
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as saved:
        keys = list(saved.keys())
    assert any(k.endswith("score.weight") for k in keys) and any("lora_A" in k for k in keys)
    assert not any("lm_head" in k or "embed_tokens" in k for k in keys)  # the body is the base's

    capsys.readouterr()
    assert main(["eval", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    result = json.loads((run / "eval.json").read_text())
    assert result["tuned"] == metrics["tuned"]  # accuracy, macro-F1, confusion matrix: bitwise
    assert result["base"] == metrics["base"] and result["forgetting"] == metrics["forgetting"]
    assert f"{tuned['accuracy']:.4f}" in out and "macro-F1" in out


def test_head_learns_a_separable_task(tiny_run_config, tmp_path):
    raw = head_config(tiny_run_config, tmp_path, max_steps=40, batch_size=4, lr=1e-2)
    raw["eval"].update(forgetting_path=None, sample_prompts=[])
    raw["data"]["validation_fraction"] = 0
    metrics = train(validate_config(raw), progress=False).metrics
    assert metrics["tuned"]["classification"]["accuracy"] == 1.0
    assert metrics["tuned"]["classification"]["macro_f1"] == 1.0
    assert metrics["final_logged_loss"] < 0.25 * metrics["first_logged_loss"]
