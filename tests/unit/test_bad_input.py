"""Every bad input through the CLI: exit code 2, one clear line on stderr, no result left behind.

A row is (id, how to break the tiny run, text the message must contain). New commands add rows.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
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


APPEND_YAML = "_append_yaml"  # a breaker's raw YAML text, appended to the dumped config


def duplicate_yaml_key(cfg: dict[str, Any], tmp: Path) -> list[str]:
    cfg[APPEND_YAML] = "train:\n  lr: 0.1\n"  # a second `train:` section, silently kept by safe_load
    return []


def output_is_a_file(cfg: dict[str, Any], tmp: Path) -> list[str]:
    target = tmp / "runs-file"
    target.write_text("not a folder")
    cfg["output"]["dir"] = str(target)
    return []


def read_only_output(cfg: dict[str, Any], tmp: Path) -> list[str]:
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder; output-not-writable covers a path under a file")
    folder = tmp / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    cfg["output"]["dir"] = str(folder / "runs")
    return []


def truncated_gguf(cfg: dict[str, Any], tmp: Path) -> list[str]:
    path = tmp / "cut.gguf"
    # the magic, version 3, then the file ends inside the tensor count
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x01\x00")
    cfg["model"]["name"] = str(path)
    return []


def model_copy(keep: tuple[str, ...]) -> Callable[[dict[str, Any], Path], Path]:
    def copy(cfg: dict[str, Any], tmp: Path) -> Path:
        folder = tmp / "model-copy"
        folder.mkdir()
        for name in keep:
            shutil.copy(Path(cfg["model"]["name"]) / name, folder / name)
        cfg["model"]["name"] = str(folder)
        return folder

    return copy


def model_without_tokenizer(cfg: dict[str, Any], tmp: Path) -> list[str]:
    model_copy(("config.json", "model.safetensors"))(cfg, tmp)
    return []


def tokenizer_without_eos(cfg: dict[str, Any], tmp: Path) -> list[str]:
    from transformers import PreTrainedTokenizerFast

    from conftest import build_tiny_tokenizer

    folder = model_copy(("config.json", "model.safetensors"))(cfg, tmp)
    backend = build_tiny_tokenizer().backend_tokenizer
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    ).save_pretrained(folder)
    return []


def csv_with_long_cell(suffix: str) -> Breaker:
    def apply(cfg: dict[str, Any], tmp: Path) -> list[str]:
        sep = "," if suffix == "csv" else "\t"
        path = tmp / f"long.{suffix}"
        path.write_text(f"text{sep}label\nfine{sep}pos\n{'x' * 200_000}{sep}neg\n")
        cfg["data"].update(kind="classification", train_path=str(path), max_seq_len=64)
        return []

    return apply


def records(kind: str, rows: list[Any], **data: Any) -> Breaker:
    """data.kind=`kind` from a jsonl file of `rows` (dicts are dumped, strings written as they are)."""

    def apply(cfg: dict[str, Any], tmp: Path) -> list[str]:
        path = tmp / "bad.jsonl"
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        cfg["data"].update(kind=kind, train_path=str(path), max_seq_len=64, **data)
        return []

    return apply


def chat(*turns: tuple[Any, Any]) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


GOOD_CHAT = chat(("user", "Hi"), ("assistant", "Hello"))
LABELS = ["neg", "pos"]


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
    # --- issue #23 -------------------------------------------------------------------------------
    (
        "csv-cell-over-field-limit",
        csv_with_long_cell("csv"),
        "long.csv: line 3 has a cell longer than 131,072 characters (the csv reader's limit)",
    ),
    ("tsv-cell-over-field-limit", csv_with_long_cell("tsv"), "long.tsv: line 3 has a cell longer than"),
    ("duplicate-yaml-key", duplicate_yaml_key, "key 'train' is given twice (first on line"),
    ("lr-infinite", override("train.lr=.inf"), "train.lr: Input should be a finite number"),
    ("lr-nan", override("train.lr=nan"), "train.lr: Input should be a finite number"),
    ("epochs-infinite", override("train.epochs=inf"), "train.epochs: Input should be a finite number"),
    (
        "negative-max-steps",
        override("train.max_steps=-1"),
        "train.max_steps: Input should be greater than or equal to 1",
    ),
    ("output-dir-is-a-file", output_is_a_file, "runs-file is a file, not a folder; set output.dir"),
    ("output-dir-read-only", read_only_output, "is not writable; set output.dir to a writable folder"),
    ("truncated-gguf", truncated_gguf, "cut.gguf (10 bytes) is cut short or corrupt"),
    ("model-without-tokenizer", model_without_tokenizer, "model-copy has no tokenizer files"),
    ("tokenizer-without-eos", tokenizer_without_eos, "has no EOS token"),
    (
        "empty-label-name",
        override("data.label_names=['', pos]"),
        "data.label_names: holds an empty name",
    ),
    (
        "repeated-label-name",
        override("data.label_names=[pos, pos]"),
        "data.label_names: names 'pos' more than once",
    ),
    (
        "chat-record-without-messages",
        records("chat", [GOOD_CHAT, {"text": "no conversation here"}]),
        "bad.jsonl: line 2: missing field 'messages'",
    ),
    (
        "chat-data-of-plain-text",
        records("chat", [{"text": "plain text"}, {"text": "more"}]),
        "bad.jsonl: line 1: data.kind=chat needs conversations",
    ),
    (
        "chat-empty-conversation",
        records("chat", [GOOD_CHAT, {"messages": []}]),
        "bad.jsonl: line 2: conversation has no assistant turn",
    ),
    (
        "chat-unknown-role",
        records("chat", [GOOD_CHAT, chat(("narrator", "Once"), ("user", "Hi"), ("assistant", "Hey"))]),
        "bad.jsonl: line 2: message 1 has role 'narrator'; known roles: system, user",
    ),
    (
        "chat-message-without-role",
        records(
            "chat", [GOOD_CHAT, {"messages": [{"content": "Hi"}, {"role": "assistant", "content": "Hey"}]}]
        ),
        "bad.jsonl: line 2: message 1 has no role",
    ),
    (
        "chat-content-not-text",
        records("chat", [GOOD_CHAT, chat(("user", "Hi"), ("assistant", 42))]),
        "bad.jsonl: line 2: message 2: content is an integer, expected text",
    ),
    (
        "chat-messages-not-a-list",
        records("chat", [GOOD_CHAT, {"messages": "Hi there"}]),
        "bad.jsonl: line 2: messages must be a list, got a string",
    ),
    (
        "chat-line-not-json",
        records("chat", [GOOD_CHAT, '{"messages": [']),
        "bad.jsonl: line 2 is not valid JSON",
    ),
    (
        "classification-record-without-label",
        records("classification", [{"text": "good", "label": "pos"}, {"text": "bad"}]),
        "bad.jsonl: line 2: missing field 'label'",
    ),
    (
        "classification-label-outside-set",
        records(
            "classification",
            [{"text": "good", "label": "pos"}, {"text": "meh", "label": "maybe"}],
            label_names=LABELS,
        ),
        "bad.jsonl: line 2: label 'maybe' is outside the label set ['neg', 'pos']",
    ),
    (
        "classification-index-outside-set",
        records(
            "classification", [{"text": "good", "label": 1}, {"text": "meh", "label": 2}], label_names=LABELS
        ),
        "bad.jsonl: line 2: label 2 is outside the label set",
    ),
    (
        "classification-empty-label",
        records("classification", [{"text": "good", "label": "pos"}, {"text": "bad", "label": " "}]),
        "bad.jsonl: line 2: label is empty",
    ),
    (
        "classification-null-label",
        records("classification", [{"text": "good", "label": "pos"}, {"text": "bad", "label": None}]),
        "bad.jsonl: line 2: label is null, expected a label name or index",
    ),
    (
        "classification-empty-text",
        records("classification", [{"text": "good", "label": "pos"}, {"text": "", "label": "neg"}]),
        "bad.jsonl: line 2: text is empty",
    ),
    (
        "classification-text-not-text",
        records("classification", [{"text": "good", "label": "pos"}, {"text": ["a"], "label": "neg"}]),
        "bad.jsonl: line 2: field 'text' is a list, expected text",
    ),
    (
        "classification-data-of-chat-format",
        records("classification", [GOOD_CHAT], format="messages"),
        "data.kind=classification needs records with a text and a label, but data.format=messages gives chat",
    ),
]


@pytest.mark.parametrize(("name", "breaker", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_clear_line(tiny_run_config, tmp_path, capsys, name, breaker, message):
    if name == "cuda-without-gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    extra = breaker(tiny_run_config, tmp_path)
    config = tmp_path / "config.yaml"
    tail = tiny_run_config.pop(APPEND_YAML, "")
    config.write_text(yaml.safe_dump(tiny_run_config) + tail)
    capsys.readouterr()
    code = main(["train", str(config), *extra, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("peftlab: error: "), err
    assert "Traceback" not in err
    assert message in err
    # nothing half-written: bad input fails before a run folder exists, and leaves no staging
    # folder or file in the cache (a GGUF conversion, tokenised data)
    runs = Path(tiny_run_config["output"]["dir"])
    assert not runs.is_dir() or not list(runs.iterdir()), f"a run folder was left: {list(runs.iterdir())}"
    cache = Path(os.environ["PEFTLAB_CACHE"])
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name], "a half-written cache entry was left"


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


def test_duplicate_yaml_keys_are_refused_with_both_lines(tmp_path):
    from peftlab.config.loading import read_yaml
    from peftlab.errors import ConfigError

    nested = tmp_path / "nested.yaml"
    nested.write_text("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n")
    with pytest.raises(
        ConfigError,
        match=r"nested.yaml is not valid YAML \(line 4\): key 'lr' is given twice \(first on line 2\)",
    ):
        read_yaml(nested)
    inline = tmp_path / "inline.yaml"
    inline.write_text("method: {name: lora, r: 4, r: 8}\n")
    with pytest.raises(ConfigError, match="key 'r' is given twice"):
        read_yaml(inline)
    # a key a merge brings in may be overridden: that is what merges are for
    merged = tmp_path / "merged.yaml"
    merged.write_text("base: &b\n  lr: 0.1\n  epochs: 2\ntrain:\n  <<: *b\n  lr: 0.3\n")
    assert read_yaml(merged)["train"] == {"lr": 0.3, "epochs": 2}


def test_tabular_line_numbers_count_blank_lines(tmp_path, tiny_tokenizer):
    from peftlab.config.sections import DataConfig
    from peftlab.data.task import build_task_data
    from peftlab.errors import DataError

    path = tmp_path / "d.tsv"
    path.write_text("good\tpos\n\nfine\tpos\n\nodd\tmaybe\n")
    cfg = DataConfig(
        train_path=str(path), kind="classification", header=False, label_names=["neg", "pos"], cache=False
    )
    with pytest.raises(DataError, match=r"d\.tsv: line 5: label 'maybe' is outside"):
        build_task_data(cfg, tiny_tokenizer)


def test_jsonl_lines_are_cut_at_newlines_only(tmp_path):
    """U+2028 and form feeds may stand raw inside a JSON string (json.dumps(ensure_ascii=False))."""
    from peftlab.data.loading import load_raw

    path = tmp_path / "d.jsonl"
    texts = ["one\u2028two", "three\x0cfour", "five\x1cand\x85six"]
    path.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8"
    )
    assert [r.fields["text"] for r in load_raw(str(path))] == texts


README_TEXT = "Zebra quagga okapi: this folder holds the training text, see SOURCE for where it came from."


def folder_with_readme(tmp_path: Path) -> Path:
    from conftest import TRAIN_TEXT

    folder = tmp_path / "text-folder"
    folder.mkdir()
    (folder / "part-1.txt").write_text(TRAIN_TEXT)
    (folder / "README").write_text(README_TEXT)
    (folder / "LICENSE.md").write_text("Permission is hereby granted, free of charge, to any zebra.")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1\x00\x00\x10\x00\xff\xfe zebra")
    (folder / "notes.csv").write_text("not,read\n")  # not a text suffix: neither read nor listed
    return folder


def test_data_folder_skips_readme_license_and_hidden_files(tmp_path, tiny_tokenizer):
    """A data folder's README, LICENSE and .DS_Store are not training text: skipped and named."""
    from peftlab.config.sections import DataConfig
    from peftlab.data.task import build_task_data

    folder = folder_with_readme(tmp_path)
    cfg = DataConfig(train_path=str(folder), block_size=16, validation_fraction=0, cache=False)
    data = build_task_data(cfg, tiny_tokenizer)
    assert data.stats["skipped_files"] == [".DS_Store", "LICENSE.md", "README"]
    blocks = data.train_dataset.blocks  # type: ignore[attr-defined]
    text = tiny_tokenizer.decode([t for block in blocks.input_ids for t in block])
    assert "Bud1" not in text and "free of charge" not in text and "quagga" not in text
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "part-1.txt").write_bytes((folder / "part-1.txt").read_bytes())
    same = build_task_data(cfg.model_copy(update={"train_path": str(alone)}), tiny_tokenizer)
    assert same.train_dataset.blocks.input_ids == blocks.input_ids  # type: ignore[attr-defined]
    assert "skipped_files" not in same.stats
    # a folder of nothing but such files has no text, and says what it skipped
    only = tmp_path / "only-readme"
    only.mkdir()
    (only / "README.md").write_text(README_TEXT)
    with pytest.raises(Exception, match=r"has no text files .*; skipped as not data: README\.md"):
        build_task_data(cfg.model_copy(update={"train_path": str(only)}), tiny_tokenizer)


def test_training_on_a_data_folder_with_readme_succeeds(tiny_run_config, tmp_path, capsys):
    tiny_run_config["data"]["train_path"] = str(folder_with_readme(tmp_path))
    tiny_run_config["train"]["max_steps"] = 2
    tiny_run_config["eval"]["enabled"] = False
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config))
    assert main(["train", str(config), "--quiet"]) == 0, capsys.readouterr().err
    manifest = json.loads((Path(tiny_run_config["output"]["dir"]) / "tiny" / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["data"]["skipped_files"] == [".DS_Store", "LICENSE.md", "README"]


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
