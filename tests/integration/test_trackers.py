"""Experiment trackers (train.report_to): TensorBoard for real (event files inside the run folder,
read back), wandb in offline mode with the network shut (its files inside the run folder, read
back; the process as before afterwards), the config field, and a sweep's group."""

import json
import os
import socket
import struct
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from peftlab.compare.sweep import load_sweep
from peftlab.config.loading import load_config, validate_config
from peftlab.errors import ConfigError
from peftlab.train import recipe
from peftlab.train.recipe import train

DEAD = "http://127.0.0.1:9"  # the discard port: anything that tried to leave would fail here


def losses_of(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


# --- the config field ------------------------------------------------------------------------------


def test_report_to_defaults_to_none_and_takes_a_name_or_a_list(tiny_run_config):
    assert validate_config(tiny_run_config).train.report_to == []
    for given, expected in [
        ("none", []),
        (["none"], []),
        (None, []),
        ([], []),
        ("wandb", ["wandb"]),
        (["tensorboard", "wandb", "tensorboard"], ["tensorboard", "wandb"]),
    ]:
        tiny_run_config["train"]["report_to"] = given
        assert validate_config(tiny_run_config).train.report_to == expected, given
    for bad, message in [
        ("comet", "train.report_to"),
        (["none", "wandb"], "'none' cannot be listed with trackers"),
    ]:
        tiny_run_config["train"]["report_to"] = bad
        with pytest.raises(ConfigError, match=message):
            validate_config(tiny_run_config)
    tiny_run_config["train"]["report_to"] = []
    tiny_run_config["train"]["tracker_group"] = " "
    with pytest.raises(ConfigError, match="tracker_group"):
        validate_config(tiny_run_config)


def test_report_to_from_overrides(tiny_run_config, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_run_config))
    assert load_config(path, ["train.report_to=none"]).train.report_to == []
    assert load_config(path, ["train.report_to=tensorboard"]).train.report_to == ["tensorboard"]
    both = load_config(path, ["train.report_to=[tensorboard,wandb]", "train.tracker_group=g"]).train
    assert both.report_to == ["tensorboard", "wandb"] and both.tracker_group == "g"


def test_a_missing_tracker_package_fails_before_a_run_folder(tiny_run_config, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    tiny_run_config["train"]["report_to"] = ["mlflow"]
    with pytest.raises(ConfigError, match=r"train.report_to: mlflow not installed \(pip install mlflow\)"):
        train(validate_config(tiny_run_config), progress=False)
    assert not Path(tiny_run_config["output"]["dir"]).exists()


# --- sweeps group their runs ------------------------------------------------------------------------


def test_a_sweep_groups_its_runs_without_changing_their_keys(tiny_run_config, tmp_path):
    base = {k: v for k, v in tiny_run_config.items() if k != "output"}

    def points(**train: Any) -> tuple[Any, ...]:
        path = tmp_path / "sweep.yaml"
        sweep = {"base": {**base, "train": {**base["train"], **train}}, "output": str(tmp_path / "sw")}
        path.write_text(yaml.safe_dump({**sweep, "name": "ranks", "axes": {"method.r": [2, 4]}}))
        return load_sweep(path).points

    plain = points()
    assert [p.config.train.tracker_group for p in plain] == ["ranks", "ranks"]
    assert all(p.config.train.report_to == [] for p in plain)
    reporting = points(report_to=["wandb"])
    assert [p.config.train.report_to for p in reporting] == [["wandb"], ["wandb"]]
    grouped = points(report_to="tensorboard", tracker_group="mine")  # the base's own group is kept
    assert [p.config.train.tracker_group for p in grouped] == ["mine", "mine"]
    # where a run reports is no part of its key: a sweep run again with trackers finds its runs
    assert [p.key for p in plain] == [p.key for p in reporting] == [p.key for p in grouped]
    assert [p.name for p in plain] == [p.name for p in grouped]


# --- TensorBoard, for real ----------------------------------------------------------------------------


def test_tensorboard_events_hold_the_losses_config_and_final_metrics(tiny_run_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny_run_config["train"]["report_to"] = "tensorboard"
    result = train(validate_config(tiny_run_config), progress=False)
    run = result.run_dir
    events = sorted((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 2  # transformers' callback and peftlab's writer (config, final metrics)
    assert not (run / "checkpoints" / "runs").exists()  # transformers' default place is not used
    assert [p for p in run.parent.parent.rglob("events.out.tfevents.*") if run not in p.parents] == []

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    logged = losses_of(run)
    assert sorted(loss) == sorted(logged) == [1, 2, 3, 4, 5, 6]
    assert loss == pytest.approx(logged, rel=1e-6)  # stored as float32

    def text(tag: str) -> str:
        return acc.Tensors(f"{tag}/text_summary")[0].tensor_proto.string_val[0].decode()

    config = text("peftlab/config")
    assert config.startswith("```yaml\n") and (run / "config.yaml").read_text() in config
    assert json.loads(text("args"))["run_name"] == "tiny"  # transformers' own: TrainingArguments
    assert json.loads(text("model_config"))["hidden_size"] == 32

    metrics = json.loads((run / "metrics.json").read_text())
    final = {tag.removeprefix("final/"): acc.Scalars(tag) for tag in acc.Tags()["scalars"] if "final/" in tag}
    assert {e.step for events in final.values() for e in events} == {6}
    expected = {
        "tokens_per_second": metrics["tokens_per_second"],
        "peak_memory_bytes": metrics["memory_split"]["peak_bytes"],
        "train_loss": metrics["train_loss"],
        "base.perplexity": metrics["base"]["perplexity"],
        "tuned.perplexity": metrics["tuned"]["perplexity"],
        "tuned.token_accuracy": metrics["tuned"]["token_accuracy"],
        "forgetting": metrics["forgetting"]["forgetting"],
    }
    assert {k: final[k][0].value for k in expected} == pytest.approx(expected, rel=1e-6)
    assert "base.classification.accuracy" not in final  # a text run has none


# --- wandb, offline, nothing leaves the machine ---------------------------------------------------------


def wandb_records(path: Path) -> list[Any]:
    """The records of an offline run's .wandb file. wandb 0.31 writes no files/config.yaml offline
    (its own reader lives in wandb-core), so this reads the format: a 7-byte W&B header, then
    LevelDB log blocks of 32 KiB whose records (crc32c, length, type) carry protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or the last fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.fixture()
def wandb_offline(tmp_path, monkeypatch):
    """wandb in offline mode, its user folders in tmp, proxies and its server at a dead local port,
    and every socket this process opens refused unless it is local (wandb's own service)."""
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_DIR": str(tmp_path / "wandb-dir"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "WANDB_BASE_URL": DEAD,
        "HTTPS_PROXY": DEAD,
        "HTTP_PROXY": DEAD,
    }.items():
        monkeypatch.setenv(name, value)
    for name in (
        "WANDB_API_KEY",
        "WANDB_PROJECT",
        "WANDB_RUN_GROUP",
        "WANDB_SERVICE",
        "NO_PROXY",
        "no_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    real_connect, reached = socket.socket.connect, []

    def local_only(self: socket.socket, address: Any) -> Any:
        if self.family != socket.AF_UNIX and address[0] not in ("127.0.0.1", "::1", "localhost"):
            reached.append(address)  # noted, as a library may swallow the error
            raise ConnectionRefusedError(f"a test tried to reach {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    import wandb

    assert wandb.run is None
    yield tmp_path
    assert reached == []


def items(updates: Any) -> dict[str, Any]:
    """A record's key/value items: plain keys, or nested keys (`train/loss` comes as one) joined."""
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in updates}


def process_state() -> dict[str, Any]:
    return {
        "environ": dict(os.environ),
        "excepthook": sys.excepthook,
        "exit": sys.exit,
        "wandb_threads": sorted(t.name for t in threading.enumerate() if "wandb" in t.name.lower()),
    }


def test_wandb_offline_run_in_the_run_folder_with_group_config_and_final_metrics(
    tiny_run_config, wandb_offline
):
    import wandb

    tiny_run_config["train"].update(report_to=["wandb"], tracker_group="ranks")
    before = process_state()
    result = train(validate_config(tiny_run_config), progress=False)
    assert process_state() == before  # environment, hooks and wandb's service as they were
    assert wandb.run is None

    run = result.run_dir
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    assert not (wandb_offline / "wandb-dir").exists()  # WANDB_DIR is not where a run's files go

    records = wandb_records(files[0])
    by_kind: dict[str, list[Any]] = {}
    for record in records:
        by_kind.setdefault(record.WhichOneof("record_type"), []).append(record)
    started = by_kind["run"][0].run
    assert (started.project, started.run_group, started.display_name) == ("peftlab", "ranks", "tiny")
    config = items(started.config.update)
    assert config["peftlab.train.report_to"] == ["wandb"] and config["peftlab.method.r"] == 4
    assert config["peftlab.model.name"] == tiny_run_config["model"]["name"]
    later = {k: v for r in by_kind["config"] for k, v in items(r.config.update).items()}
    assert later["run_name"] == "tiny" and later["learning_rate"] == 5e-3  # the WandbCallback's

    history = [items(r.history.item) for r in by_kind["history"]]
    losses = {h["train/global_step"]: h["train/loss"] for h in history if "train/loss" in h}
    assert losses == pytest.approx(losses_of(run))

    summary = {k: v for r in by_kind["summary"] for k, v in items(r.summary.update).items()}
    metrics = json.loads((run / "metrics.json").read_text())
    assert summary["final/tokens_per_second"] == pytest.approx(metrics["tokens_per_second"])
    assert summary["final/peak_memory_bytes"] == metrics["memory_split"]["peak_bytes"]
    assert summary["final/tuned.perplexity"] == pytest.approx(metrics["tuned"]["perplexity"])
    assert by_kind["exit"][0].exit.exit_code == 0


def test_a_failed_run_finishes_its_wandb_run_as_failed_and_restores_the_process(
    tiny_run_config, wandb_offline, monkeypatch
):
    def bomb(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bomb in step 1")

    monkeypatch.setattr(recipe.PeftlabTrainer, "training_step", bomb)
    tiny_run_config["train"]["report_to"] = "wandb"
    before = process_state()
    with pytest.raises(RuntimeError, match="bomb in step 1"):
        train(validate_config(tiny_run_config), progress=False)
    assert process_state() == before
    run = Path(tiny_run_config["output"]["dir"]) / "tiny"
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"
    (file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    (exit_record,) = [r for r in wandb_records(file) if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit.exit_code == 1
    started = next(r.run for r in wandb_records(file) if r.WhichOneof("record_type") == "run")
    assert started.run_group == ""  # no group outside a sweep unless the config names one
