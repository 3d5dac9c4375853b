"""Run folders: failed runs are marked and never look like results; secrets never land in them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab.config.loading import validate_config
from peftlab.errors import PeftlabError
from peftlab.runs import load_run
from peftlab.train.recipe import train

PLANTED = "hf_PLANTEDsecretTOKEN1234567890abcdef"


def test_hub_token_never_lands_in_the_run_folder(tiny_run_config, monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN"):
        monkeypatch.setenv(name, PLANTED)
    tiny_run_config["train"]["save_steps"] = 3
    run = train(validate_config(tiny_run_config), progress=False).run_dir
    files = [p for p in run.rglob("*") if p.is_file()]
    assert len(files) > 10  # config, manifest, metrics, log, adapter, checkpoints, plot
    leaking = [p for p in files if PLANTED.encode() in p.read_bytes()]
    assert leaking == []


def test_a_failed_run_is_marked_failed_and_has_no_metrics(tiny_run_config, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr("peftlab.train.recipe.PeftlabTrainer.train", explode)
    with pytest.raises(RuntimeError):
        train(validate_config(tiny_run_config), progress=False)
    run = next(Path(tiny_run_config["output"]["dir"]).iterdir())
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert manifest["error"] == "RuntimeError: disk on fire"
    assert any("explode" in frame for frame in manifest["traceback"])
    assert not (run / "metrics.json").exists()
    with pytest.raises(PeftlabError, match="is failed: RuntimeError: disk on fire; pass allow_unfinished"):
        load_run(run)
    assert load_run(run, allow_unfinished=True)["metrics"] is None


def test_load_run_reads_a_completed_run_and_refuses_other_folders(tiny_run_config, tmp_path):
    tiny_run_config["eval"]["enabled"] = False
    run = train(validate_config(tiny_run_config), progress=False).run_dir
    loaded = load_run(run)
    assert loaded["manifest"]["status"] == "completed" and loaded["metrics"]["train_steps"] == 6
    with pytest.raises(PeftlabError, match="is not a peftlab run folder"):
        load_run(tmp_path)
