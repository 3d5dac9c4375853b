"""Resume after SIGKILL and after Ctrl-C gives exactly the run that was never interrupted.

Every signal is sent by the training process to itself, from a callback, at a chosen step: the
interruption lands at the same point every time, with no sleeping or polling. Interrupted runs and
resumed runs train in child processes: a resumed run fixes glibc's malloc thresholds
(`train.release_memory` auto, and a resumed run is not estimated), which nothing can undo, so doing
it inside pytest would change the process every later test runs in.
"""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftlab.cli import main
from peftlab.config.loading import validate_config
from peftlab.cpu import malloc
from peftlab.train.checkpoints import COMPLETE_MARKER, newest_complete_checkpoint
from peftlab.train.recipe import train

# Runs peftlab's CLI in a child process with a callback that signals the process itself:
#   sigint N   Ctrl-C in the middle of step N (at its start, so GracefulInterrupt's handler, installed
#              by train_model, sees it while step N trains: the run saves checkpoint-N and stops)
#   sigterm N  the same with SIGTERM (what timeout, batch schedulers and Ray's cancellation send)
#   sigkill N  SIGKILL once checkpoint-N is written, before CheckpointMarker marks it complete
SIGNAL_AT_STEP = """
import os, signal, sys
from transformers import TrainerCallback
from peftlab.cli import main
from peftlab.train import recipe
from peftlab.train.callbacks import CheckpointMarker

how, at = sys.argv[1], int(sys.argv[2])


class SignalAtStep(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if how in ("sigint", "sigterm") and state.global_step == at - 1:
            os.kill(os.getpid(), signal.SIGINT if how == "sigint" else signal.SIGTERM)

    def on_save(self, args, state, control, **kwargs):
        if how == "sigkill" and state.global_step == at:
            os.kill(os.getpid(), signal.SIGKILL)


build_trainer = recipe.build_trainer


def build_trainer_with_signal(run, model):
    trainer = build_trainer(run, model)
    callbacks = trainer.callback_handler.callbacks
    marker = next(i for i, cb in enumerate(callbacks) if isinstance(cb, CheckpointMarker))
    callbacks.insert(marker, SignalAtStep())  # on_save runs before the marker's
    return trainer


recipe.build_trainer = build_trainer_with_signal
sys.exit(main(sys.argv[3:]))
"""

CHILD_TIMEOUT = 300  # seconds; a few on an idle machine, but the CPU may be shared


@pytest.fixture(autouse=True)
def _malloc_left_as_it_was():
    """Nothing here fixes this process's malloc thresholds: every resume runs in a child."""
    before = malloc.memory_released()
    yield
    assert malloc.memory_released() == before, "a test fixed pytest's glibc malloc thresholds"


@pytest.fixture()
def resumable(tiny_run_config, tmp_path):
    """An uninterrupted reference run, and the config and script for a run that will be stopped."""
    tiny_run_config["train"].update(max_steps=6, save_steps=2, save_total_limit=5, seed=0)
    tiny_run_config["eval"]["enabled"] = False
    # in this process: never fix the malloc thresholds (auto would not either, for the tiny model)
    reference_config = copy.deepcopy(tiny_run_config)
    reference_config["train"]["release_memory"] = False
    reference = train(validate_config(reference_config), progress=False).run_dir
    config = tmp_path / "config.yaml"
    tiny_run_config["output"]["name"] = "victim"
    config.write_text(yaml.safe_dump(tiny_run_config))
    script = tmp_path / "signal_at_step.py"
    script.write_text(SIGNAL_AT_STEP)
    return reference, config, script, Path(tiny_run_config["output"]["dir"]) / "victim"


def run_stopped_at(script: Path, how: str, step: int, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), how, str(step), "train", str(config), "--quiet"],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )


def resume_in_child(run: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "peftlab", "train", "--resume", str(run), "--quiet"],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming {run} from " in done.stdout


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def assert_same_run(reference: Path, resumed: Path) -> None:
    a = load_file(reference / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "adapters differ"
    ref_log, got_log = read_log(reference), read_log(resumed)
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
    killed = run_stopped_at(script, "sigkill", 4, config)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert json.loads((victim / "manifest.json").read_text())["status"] == "running"
    assert not (victim / "metrics.json").exists()
    # The kill landed in the middle of checkpoint-4: its files are written, its marker is not.
    partial = victim / "checkpoints" / "checkpoint-4"
    assert (partial / "adapter_model.safetensors").is_file()
    assert not (partial / COMPLETE_MARKER).exists()
    assert newest_complete_checkpoint(victim) == victim / "checkpoints" / "checkpoint-2"
    assert [r["step"] for r in read_log(victim)][-2:] == [4, 4]  # step 4's loss and validation
    resume_in_child(victim)
    assert_same_run(reference, victim)
    manifest = json.loads((victim / "manifest.json").read_text())
    assert [r["from"] for r in manifest["resumed"]] == ["checkpoint-2"]


@pytest.mark.parametrize(("how", "said"), [("sigint", "Ctrl-C"), ("sigterm", "SIGTERM")])
def test_ctrl_c_or_sigterm_saves_marks_interrupted_and_resumes_exactly(resumable, how, said):
    reference, config, script, victim = resumable
    stopped = run_stopped_at(script, how, 3, config)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert f"{said}: saving a checkpoint after this step" in stopped.stdout
    assert f"interrupted at step 3; resume with: peftlab train --resume {victim}" in stopped.stdout
    manifest = json.loads((victim / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert not (victim / "metrics.json").exists()
    # step 3 finished, was saved and marked complete, and nothing after it ran
    assert newest_complete_checkpoint(victim) == victim / "checkpoints" / "checkpoint-3"
    assert sorted(p.name for p in (victim / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert [r["step"] for r in read_log(victim) if "loss" in r] == [1, 2, 3]
    resume_in_child(victim)
    assert_same_run(reference, victim)
    manifest = json.loads((victim / "manifest.json").read_text())
    assert [r["from"] for r in manifest["resumed"]] == ["checkpoint-3"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "is not a peftlab run folder"),
        ("no_checkpoint", "has no complete checkpoint to resume from"),
        ("completed", "already completed"),
    ],
)
def test_resume_refuses_what_it_cannot_resume(tiny_run_config, tmp_path, capsys, setup, message):
    # in this process: the refusal comes before anything process-wide (the autouse fixture checks)
    tiny_run_config["eval"]["enabled"] = False
    tiny_run_config["train"]["release_memory"] = False
    target = tmp_path / "nothing"
    if setup != "missing":
        target = train(validate_config(tiny_run_config), progress=False).run_dir
        if setup == "no_checkpoint":
            manifest = json.loads((target / "manifest.json").read_text())
            (target / "manifest.json").write_text(json.dumps({**manifest, "status": "failed"}))
    assert main(["train", "--resume", str(target), "--quiet"]) == 2
    assert message in capsys.readouterr().err
