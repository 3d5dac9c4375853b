"""model/fingerprint.py and the base-evaluation cache keyed by it: a model is what its bytes are, so a
folder rewritten in place is evaluated again, an unchanged one is read from the cache, a weight file
is hashed once, and a hub id that cannot be pinned to a commit offline is never cached."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save

from peftlab.cache import cache_dir
from peftlab.config.loading import validate_config
from peftlab.evaluation import base_cache
from peftlab.evaluation.inputs import build_eval_inputs
from peftlab.evaluation.saved_run import evaluate_base_model
from peftlab.model import fingerprint
from peftlab.model.fingerprint import is_pinned, model_fingerprint
from peftlab.model.loading import ModelSource
from peftlab.run_setup import set_up

HOUR_AGO_NS = time.time_ns() - 3600 * 10**9


def local(folder: Path) -> ModelSource:
    return ModelSource(str(folder), f"local folder {folder}")


def model_copy(tiny_model_dir: Path, tmp_path: Path, name: str = "model") -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_model_dir, folder)
    return folder


def backdate(file: Path, ns: int = HOUR_AGO_NS) -> None:
    """Age a file past the racy window, so its hash may be remembered."""
    os.utime(file, ns=(ns, ns))


def rewrite_in_place(weights: Path, scale: float = 2.0) -> None:
    """Multiply the final norm's weight and write the file over itself: same tensor names and shapes,
    so the same size, and the same inode."""
    with safe_open(str(weights), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * scale
    data = save(tensors, metadata=metadata)
    with weights.open("r+b") as handle:
        handle.write(data)
        handle.truncate()


def counting_hashes(monkeypatch) -> list[str]:
    """The names of the files whose bytes content_sha256 reads from now on."""
    reads: list[str] = []
    real = fingerprint.content_sha256

    def counting(path: Path) -> str:
        reads.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(fingerprint, "content_sha256", counting)
    return reads


def test_a_folder_changed_in_place_is_evaluated_again_and_an_unchanged_one_hits_the_cache(
    tiny_run_config, tiny_model_dir, tmp_path
):
    folder = model_copy(tiny_model_dir, tmp_path)
    weights = folder / "model.safetensors"
    cfg = validate_config({**tiny_run_config, "model": {**tiny_run_config["model"], "name": str(folder)}})

    first = evaluate_base_model(cfg, progress=False)
    again = evaluate_base_model(cfg, progress=False)
    assert (first["base_eval_cached"], again["base_eval_cached"]) == (False, True)
    assert again["base"] == first["base"]

    before, size = model_fingerprint(local(folder)), weights.stat().st_size
    rewrite_in_place(weights)
    assert weights.stat().st_size == size  # what the old name-and-size key could not tell apart
    assert model_fingerprint(local(folder)) != before

    changed = evaluate_base_model(cfg, progress=False)
    assert changed["base_eval_cached"] is False
    assert changed["base"]["perplexity"] != first["base"]["perplexity"]
    changed_again = evaluate_base_model(cfg, progress=False)
    assert changed_again["base_eval_cached"] is True and changed_again["base"] == changed["base"]


def test_a_weight_file_is_read_once_until_it_changes(tiny_model_dir, tmp_path, monkeypatch):
    folder = model_copy(tiny_model_dir, tmp_path)
    weights = folder / "model.safetensors"
    backdate(weights)
    reads = counting_hashes(monkeypatch)

    first = model_fingerprint(local(folder))
    assert reads.count("model.safetensors") == 1
    assert model_fingerprint(local(folder)) == first
    assert reads.count("model.safetensors") == 1  # the memo answered; no weight byte was read
    memos = list((cache_dir() / "fingerprints").glob("*.json"))
    assert [json.loads(m.read_text())["path"] for m in memos] == [str(weights.resolve())]

    backdate(weights, HOUR_AGO_NS + 10**9)  # touched: same bytes, another mtime
    assert model_fingerprint(local(folder)) == first
    assert reads.count("model.safetensors") == 2

    # rewritten with the same size and its old mtime put back: the inode's ctime still moved
    stat = weights.stat()
    rewrite_in_place(weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    now = weights.stat()
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    assert model_fingerprint(local(folder)) != first
    assert reads.count("model.safetensors") == 3


def test_a_file_written_just_now_is_hashed_but_not_remembered(tiny_model_dir, tmp_path, monkeypatch):
    folder = model_copy(tiny_model_dir, tmp_path)
    rewrite_in_place(folder / "model.safetensors")  # mtime: now (a write in the same tick keeps it)
    reads = counting_hashes(monkeypatch)
    assert model_fingerprint(local(folder)) == model_fingerprint(local(folder))
    assert reads.count("model.safetensors") == 2
    assert not list((cache_dir() / "fingerprints").glob("*.json"))


def test_the_config_and_the_pickle_weights_of_a_pickle_only_folder_count(tiny_model_dir, tmp_path):
    folder = model_copy(tiny_model_dir, tmp_path)
    before = model_fingerprint(local(folder))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    assert model_fingerprint(local(folder)) != before

    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")  # bytes only; never loaded
    pickled = model_fingerprint(local(folder))
    with (folder / "pytorch_model.bin").open("r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 1]))
    assert model_fingerprint(local(folder)) != pickled


def test_a_converted_gguf_folder_changes_identity_with_the_gguf_bytes(tiny_model_dir, tmp_path):
    folder = model_copy(tiny_model_dir, tmp_path)
    record = folder / "peftlab_source.json"
    record.write_text(json.dumps({"gguf": "/models/a.gguf", "sha256": "a" * 64}))
    first = model_fingerprint(local(folder))
    record.write_text(json.dumps({"gguf": "/models/a.gguf", "sha256": "b" * 64}))
    assert model_fingerprint(local(folder)) != first
    record.write_text(json.dumps({"gguf": "/elsewhere/a.gguf", "sha256": "a" * 64}))
    assert model_fingerprint(local(folder)) == first  # the same bytes, moved: the same model


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty local hub cache, offline: nothing here may reach the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "hub"
    path.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(path))
    return path


def cache_snapshot(hub: Path, repo_id: str, commit: str, ref: str = "main") -> None:
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)


def score_as(source: ModelSource, cfg, setup, model, inputs) -> bool:
    _, hit = base_cache.score_base(model, cfg, dataclasses.replace(setup, source=source), inputs, False)
    return hit


@pytest.fixture()
def base_scoring(tiny_run_config, monkeypatch):
    """(cfg, setup, model, inputs, evaluations made) for scoring the tiny model under any source."""
    from transformers import AutoModelForCausalLM

    # the cache is under test here, not the metrics: no samples, no forgetting text
    lean: dict[str, object] = {"sample_prompts": [], "forgetting_path": None}
    cfg = validate_config({**tiny_run_config, "eval": {**tiny_run_config["eval"], **lean}})
    setup = set_up(cfg, spec=None)
    inputs = build_eval_inputs(cfg, setup.tokenizer, setup.task)
    model = AutoModelForCausalLM.from_pretrained(setup.source.path).eval()
    calls: list[int] = []
    real = base_cache.evaluate_model

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(base_cache, "evaluate_model", counting)
    return cfg, setup, model, inputs, calls


def test_a_hub_id_not_resolved_offline_is_never_cached(hub_cache, base_scoring, capsys):
    cfg, setup, model, inputs, calls = base_scoring
    source = ModelSource("peftlab-test/no-such-model", "hub peftlab-test/no-such-model")
    identity = model_fingerprint(source)
    assert identity == "hub:peftlab-test/no-such-model@unresolved" and not is_pinned(identity)
    assert not is_pinned(model_fingerprint(source, revision="v1.0"))

    assert (score_as(source, cfg, setup, model, inputs), score_as(source, cfg, setup, model, inputs)) == (
        False,
        False,
    )
    assert len(calls) == 2
    assert "base evaluation: not cached" in capsys.readouterr().out
    assert not (cache_dir() / "evals").exists()


def test_a_hub_id_is_its_cached_commit_and_a_moved_revision_is_a_new_model(hub_cache, base_scoring):
    cfg, setup, model, inputs, calls = base_scoring
    repo_id, old, new = "peftlab-test/fake", "1" * 40, "2" * 40
    source = ModelSource(repo_id, f"hub {repo_id}")
    cache_snapshot(hub_cache, repo_id, old)
    assert model_fingerprint(source) == f"hub:{repo_id}@{old}" and is_pinned(model_fingerprint(source))
    assert score_as(source, cfg, setup, model, inputs) is False
    assert score_as(source, cfg, setup, model, inputs) is True

    cache_snapshot(hub_cache, repo_id, new)  # main moved on
    assert model_fingerprint(source) == f"hub:{repo_id}@{new}"
    assert model_fingerprint(source, revision=old) == f"hub:{repo_id}@{old}"
    assert score_as(source, cfg, setup, model, inputs) is False
    assert len(calls) == 2
