"""Resume after SIGKILL and after Ctrl-C gives exactly the run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftlab.cli import main
from peftlab.config.loading import validate_config
from peftlab.train.checkpoints import COMPLETE_MARKER
from peftlab.train.recipe import train

# Runs peftlab's CLI in a child process whose training pauses after a given step, so the test can
# kill or interrupt it at a known point.
CHILD = """
import sys, time
from peftlab.train.callbacks import JsonlLogger
from peftlab.cli import main
pause_at, pause_seconds = int(sys.argv[1]), float(sys.argv[2])
original = JsonlLogger.on_log
def on_log(self, args, state, control, logs=None, **kwargs):
    original(self, args, state, control, logs=logs, **kwargs)
    if state.global_step >= pause_at:
        time.sleep(pause_seconds)
JsonlLogger.on_log = on_log
sys.exit(main(sys.argv[3:]))
"""


def logged_steps(run: Path) -> list[int]:
    log = run / "log.jsonl"
    return [json.loads(line)["step"] for line in log.read_text().splitlines()] if log.is_file() else []


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the child process")


@pytest.fixture()
def resumable(tiny_run_config, tmp_path):
    tiny_run_config["train"].update(max_steps=6, save_steps=2, save_total_limit=5)
    tiny_run_config["eval"]["enabled"] = False
    reference = train(validate_config(tiny_run_config), progress=False).run_dir
    config = tmp_path / "config.yaml"
    tiny_run_config["output"]["name"] = "victim"
    config.write_text(yaml.safe_dump(tiny_run_config))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return reference, config, script, Path(tiny_run_config["output"]["dir"]) / "victim"


def assert_same_run(reference: Path, resumed: Path) -> None:
    a = load_file(reference / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "adapters differ"
    ref_log = [json.loads(x) for x in (reference / "log.jsonl").read_text().splitlines()]
    got_log = [json.loads(x) for x in (resumed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got_log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in got_log if "loss" in r] == [r["loss"] for r in ref_log if "loss" in r]
    # validation at every save (steps 2, 4, 6), each once, with the same losses
    assert [r["step"] for r in got_log if "eval_loss" in r] == [2, 4, 6]
    assert [r["eval_loss"] for r in got_log if "eval_loss" in r] == [
        r["eval_loss"] for r in ref_log if "eval_loss" in r
    ]
    ref_metrics = json.loads((reference / "metrics.json").read_text())
    got_metrics = json.loads((resumed / "metrics.json").read_text())
    for key in ("best_checkpoint", "best_eval_loss", "final_eval_loss", "eval_count"):
        assert got_metrics[key] == ref_metrics[key], key
    assert json.loads((resumed / "manifest.json").read_text())["status"] == "completed"


def test_resume_after_sigkill_equals_an_uninterrupted_run(resumable):
    reference, config, script, victim = resumable
    child = subprocess.Popen([sys.executable, str(script), "3", "60", "train", str(config), "--quiet"])
    try:
        wait_for(
            lambda: (
                3 in logged_steps(victim)
                and (victim / "checkpoints" / "checkpoint-2" / COMPLETE_MARKER).is_file()
            )
        )
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert json.loads((victim / "manifest.json").read_text())["status"] == "running"
    assert not (victim / "metrics.json").exists()
    # A checkpoint the kill landed in the middle of: files but no completion marker. Never taken.
    partial = victim / "checkpoints" / "checkpoint-4"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"half")
    assert main(["train", "--resume", str(victim), "--quiet"]) == 0
    assert_same_run(reference, victim)
    manifest = json.loads((victim / "manifest.json").read_text())
    assert manifest["resumed"][0]["from"] == "checkpoint-2"


def test_ctrl_c_saves_marks_interrupted_and_resumes_exactly(resumable):
    reference, config, script, victim = resumable
    child = subprocess.Popen(
        [sys.executable, str(script), "2", "1.5", "train", str(config), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: 2 in logged_steps(victim))
    os.kill(child.pid, signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert f"resume with: peftlab train --resume {victim}" in out
    manifest = json.loads((victim / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert not (victim / "metrics.json").exists()
    assert (victim / "checkpoints" / "checkpoint-3" / COMPLETE_MARKER).is_file()
    assert main(["train", "--resume", str(victim), "--quiet"]) == 0
    assert_same_run(reference, victim)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "is not a peftlab run folder"),
        ("no_checkpoint", "has no complete checkpoint to resume from"),
        ("completed", "already completed"),
    ],
)
def test_resume_refuses_what_it_cannot_resume(tiny_run_config, tmp_path, capsys, setup, message):
    tiny_run_config["eval"]["enabled"] = False
    target = tmp_path / "nothing"
    if setup != "missing":
        target = train(validate_config(tiny_run_config), progress=False).run_dir
        if setup == "no_checkpoint":
            manifest = json.loads((target / "manifest.json").read_text())
            (target / "manifest.json").write_text(json.dumps({**manifest, "status": "failed"}))
    assert main(["train", "--resume", str(target), "--quiet"]) == 2
    assert message in capsys.readouterr().err
