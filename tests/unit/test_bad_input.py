"""Every bad input through the CLI: exit code 2, one clear line on stderr, no result left behind.

A row is (id, how to break the tiny run, text the message must contain). New commands add rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from peftlab.cli import main

Breaker = Callable[[dict[str, Any], Path], list[str]]  # mutates the config, returns extra CLI args


def override(*items: str) -> Breaker:
    return lambda cfg, tmp: list(items)


def method(section: dict[str, Any]) -> Breaker:
    def apply(cfg: dict[str, Any], tmp: Path) -> list[str]:
        cfg["method"] = section
        return []

    return apply


def set_data(text: bytes, key: str = "train_path") -> Breaker:
    def apply(cfg: dict[str, Any], tmp: Path) -> list[str]:
        path = tmp / f"bad-{key}.txt"
        path.write_bytes(text)
        cfg["data"][key] = str(path)
        return []

    return apply


def model_folder(files: dict[str, bytes]) -> Breaker:
    def apply(cfg: dict[str, Any], tmp: Path) -> list[str]:
        folder = tmp / "bad-model"
        folder.mkdir()
        for name, content in files.items():
            (folder / name).write_bytes(content)
        cfg["model"]["name"] = str(folder)
        return []

    return apply


def fake_gguf(cfg: dict[str, Any], tmp: Path) -> list[str]:
    path = tmp / "model.gguf"
    path.write_bytes(b"PK\x03\x04 a zip, not a gguf")
    cfg["model"]["name"] = str(path)
    return []


def pickle_model(cfg: dict[str, Any], tmp: Path) -> list[str]:
    folder = tmp / "pickle-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    cfg["model"]["name"] = str(folder)
    return []


def unwritable_output(cfg: dict[str, Any], tmp: Path) -> list[str]:
    blocker = tmp / "a-file"
    blocker.write_text("not a folder")
    cfg["output"]["dir"] = str(blocker / "runs")
    return []


def empty_folder(cfg: dict[str, Any], tmp: Path) -> list[str]:
    (tmp / "empty-data").mkdir()
    cfg["data"]["train_path"] = str(tmp / "empty-data")
    return []


CASES: list[tuple[str, Breaker, str]] = [
    ("unknown-section", override("trian.lr=1"), "unknown config key 'trian' (did you mean 'train'?)"),
    ("unknown-key", override("method.rank=8"), "unknown config key 'method.rank' (did you mean 'method.r'?)"),
    ("typo-in-data", override("data.blok_size=8"), "did you mean 'data.block_size'?"),
    ("negative-lr", override("train.lr=-1"), "train.lr: Input should be greater than 0"),
    (
        "zero-batch",
        override("train.batch_size=0"),
        "train.batch_size: Input should be greater than or equal to 1",
    ),
    ("batch-not-int", override("train.batch_size=many"), "train.batch_size: Input should be a valid integer"),
    ("dropout-range", override("method.dropout=1.0"), "method.dropout: Input should be less than 1"),
    ("rank-zero", override("method.r=0"), "method.r: Input should be greater than 0"),
    ("unknown-method", override("method.name=lorra"), "unknown method 'lorra'; registered methods:"),
    (
        "stride-over-window",
        override("eval.stride=32", "eval.window=16"),
        "eval.stride (32) must be <= eval.window (16)",
    ),
    (
        "block-size-one",
        override("data.block_size=1"),
        "data.block_size: Input should be greater than or equal to 2",
    ),
    ("bad-dtype", override("model.dtype=float8"), "model.dtype: Input should be"),
    ("bad-override-form", override("train"), "is not of the form key.sub=value"),
    (
        "zero-token-budget",
        override("data.max_train_tokens=0"),
        "data.max_train_tokens: Input should be greater than or equal to 1",
    ),
    (
        "missing-train-file",
        override("data.train_path=/no/such/file.raw"),
        "data file or folder not found: /no/such/file.raw",
    ),
    (
        "missing-eval-file",
        override("data.eval_path=/no/such/eval.raw"),
        "data file or folder not found: /no/such/eval.raw",
    ),
    ("no-eval-path", override("data.eval_path=null"), "data.eval_path is not set"),
    ("empty-data", set_data(b""), "holds no text"),
    ("whitespace-data", set_data(b"\n\n   \n"), "holds no text"),
    ("undecodable-bytes", set_data(b"fine line\n\xff\xfe broken\n"), "line 2 is not valid UTF-8"),
    ("folder-without-text", empty_folder, "has no text files"),
    (
        "too-little-data",
        override("data.max_train_tokens=10"),
        "data.max_train_tokens=10 is fewer than one block of data.block_size=32",
    ),
    ("missing-model", override("model.name=/no/such/model"), "is neither a built-in alias"),
    ("not-a-model-name", override("model.name=just words"), "is neither a built-in alias"),
    ("model-without-weights", model_folder({"config.json": b"{}"}), "has no *.safetensors weights"),
    ("model-without-config", model_folder({"model.safetensors": b""}), "has no config.json"),
    ("pickle-weights", pickle_model, "has only pickle weights (*.bin); peftlab loads safetensors only"),
    ("gguf-not-gguf", fake_gguf, "is not a GGUF file"),
    ("target-matches-nothing", override("method.target_modules=[qkv]"), "match no module; linear modules:"),
    (
        "regex-matches-nothing",
        override("method.target_modules=nothing.*"),
        "matches no module; linear modules:",
    ),
    ("galore-rank-too-big", method({"name": "galore", "rank": 999}), "galore.rank=999 is larger than layer"),
    ("freeze-too-many-layers", method({"name": "freeze", "last_layers": 9}), "but the model has 2 layers"),
    (
        "head-method-on-text-data",
        method({"name": "classification_head"}),
        "method classification_head needs data.kind=classification (a fixed label set); got data.kind=text",
    ),
    (
        "head-method-with-chunked-loss",
        lambda cfg, tmp: [
            *method({"name": "classification_head"})(cfg, tmp),
            "data.kind=classification",
            "train.loss=chunked",
        ],
        "train.loss=chunked is a causal-LM token loss",
    ),
    (
        "block-over-model-limit",
        override("data.block_size=4096"),
        "data.block_size=4096 is over the model's limit of 256",
    ),
    (
        "window-over-model-limit",
        override("eval.window=4096", "eval.stride=8"),
        "eval.window=4096 is over the model's limit of 256",
    ),
    (
        "eval-steps-not-save-steps",
        override("train.eval_steps=3", "train.save_steps=2"),
        "train.eval_steps (3) must equal train.save_steps (2)",
    ),
    (
        "eval-steps-without-validation",
        override("train.eval_steps=2", "data.validation_fraction=0"),
        "train.eval_steps needs a validation set",
    ),
    (
        "validation-fraction-one",
        override("data.validation_fraction=1"),
        "data.validation_fraction: Input should be less than 1",
    ),
    (
        "missing-validation-file",
        override("data.validation_path=/no/such/valid.raw"),
        "data file or folder not found: /no/such/valid.raw",
    ),
    ("cuda-without-gpu", override("model.device=cuda"), "no CUDA device is visible"),
    ("output-not-writable", unwritable_output, "cannot create output folder"),
    (
        "forgetting-text-missing",
        override("eval.forgetting_path=/no/such/general.txt"),
        "eval.forgetting_path: file not found: /no/such/general.txt",
    ),
    (
        "empty-sample-prompt",
        override("eval.sample_prompts=['hi', ' ']"),
        "eval.sample_prompts holds an empty prompt",
    ),
    (
        "zero-new-tokens",
        override("eval.max_new_tokens=0"),
        "eval.max_new_tokens: Input should be greater than",
    ),
]


@pytest.mark.parametrize(("name", "breaker", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_clear_line(tiny_run_config, tmp_path, capsys, name, breaker, message):
    if name == "cuda-without-gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    extra = breaker(tiny_run_config, tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config))
    capsys.readouterr()
    code = main(["train", str(config), *extra, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("peftlab: error: "), err
    assert "Traceback" not in err
    assert message in err
    runs = Path(tiny_run_config["output"]["dir"])
    assert not list(runs.glob("**/metrics.json")), "a failed run must leave no result"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "/no/such/config.yaml"], "config file not found: /no/such/config.yaml"),
        (["train", "--resume", "/no/such/run"], "is not a peftlab run folder"),
        (["train"], "give a config file (see configs/) or --resume RUN_DIR"),
        (
            ["estimate", "--model", "/no/such/config.json"],
            "model config file not found: /no/such/config.json",
        ),
        (["estimate", "--model", "x.json", "--gpu", "v100"], "unknown --gpu 'v100'; known: t4, a10g"),
        (["estimate", "--method", "lorra"], "unknown method 'lorra'"),
    ],
)
def test_bad_command_lines(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_broken_yaml_and_non_mapping_yaml(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    assert main(["train", str(broken)]) == 2
    assert "is not valid YAML (line 2)" in capsys.readouterr().err
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    assert main(["train", str(listing)]) == 2
    assert "must hold a mapping of sections" in capsys.readouterr().err


def test_allow_pickle_is_an_explicit_opt_in(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from peftlab.config.sections import ModelConfig
    from peftlab.model.loading import load_model, resolve_source

    folder = tmp_path / "bin-model"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder / "config.json")
    torch.save(load_file(tiny_model_dir / "model.safetensors"), folder / "pytorch_model.bin")
    with pytest.raises(Exception, match="only pickle weights"):
        resolve_source(ModelConfig(name=str(folder)))
    cfg = ModelConfig(name=str(folder), allow_pickle=True)
    model = load_model(resolve_source(cfg), cfg, torch.device("cpu"), torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
    )


# --- peftlab eval ------------------------------------------------------------------------------


def fake_run(status: str, error: str | None = None, adapter: bool = False) -> Callable[..., list[str]]:
    """A run folder as train() leaves it (config, manifest, metrics), without training."""

    def make(cfg: dict[str, Any], tmp: Path) -> list[str]:
        run = tmp / "runs" / "fake"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        (run / "manifest.json").write_text(json.dumps({"status": status, "error": error}))
        if status == "completed":
            (run / "metrics.json").write_text("{}")
        if adapter:
            (run / "adapter").mkdir()
            (run / "adapter" / "adapter_config.json").write_text("{}")
            (run / "adapter" / "adapter_model.bin").write_bytes(b"pickle")
        return ["eval", str(run)]

    return make


def eval_config(*extra: str) -> Callable[..., list[str]]:
    def make(cfg: dict[str, Any], tmp: Path) -> list[str]:
        path = tmp / "eval.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return ["eval", "--config", str(path), *extra]

    return make


def fixed(*args: str) -> Callable[..., list[str]]:
    return lambda cfg, tmp: list(args)


EVAL_CASES: list[tuple[str, Callable[..., list[str]], str]] = [
    ("no-arguments", fixed("eval"), "give a run folder (peftlab eval RUN_DIR) or --config CONFIG"),
    ("not-a-run-folder", fixed("eval", "/no/such/run"), "/no/such/run is not a peftlab run folder"),
    ("model-without-config", fixed("eval", "--model", "x"), "--model needs --config CONFIG"),
    ("missing-config", fixed("eval", "--config", "/no/such.yaml"), "config file not found: /no/such.yaml"),
    (
        "failed-run",
        fake_run("failed", "RuntimeError: disk on fire"),
        "is failed (RuntimeError: disk on fire); only a completed run can be evaluated",
    ),
    ("interrupted-run", fake_run("interrupted"), "is interrupted; only a completed run can be evaluated"),
    (
        "missing-adapter",
        fake_run("completed"),
        "adapter is missing adapter_config.json, adapter_model.safetensors",
    ),
    ("pickle-adapter", fake_run("completed", adapter=True), "is missing adapter_model.safetensors"),
    (
        "run-with-model-override",
        lambda cfg, tmp: [*fake_run("completed")(cfg, tmp), "model.name=other"],
        "peftlab eval RUN_DIR takes eval.* overrides only (got 'model.name=other')",
    ),
    (
        "out-with-run-dir",
        lambda cfg, tmp: [*fake_run("completed")(cfg, tmp), "--out", "x.json"],
        "--out is for --config",
    ),
    ("unknown-model", eval_config("--model", "/no/such/model"), "is neither a built-in alias"),
    (
        "eval-bad-override",
        eval_config("eval.window=1"),
        "eval.window: Input should be greater than or equal to 2",
    ),
    (
        "eval-window-over-limit",
        eval_config("eval.window=4096", "eval.stride=8"),
        "eval.window=4096 is over the model's limit of 256",
    ),
]


@pytest.mark.parametrize(("name", "make", "message"), EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_eval_bad_input_exits_2_with_one_clear_line(tiny_run_config, tmp_path, capsys, name, make, message):
    args = make(tiny_run_config, tmp_path)
    capsys.readouterr()
    code = main([*args, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("peftlab: error: "), err
    assert "Traceback" not in err
    assert message in err
    assert not list(tmp_path.glob("**/eval.json")), "a failed evaluation must leave no result"
