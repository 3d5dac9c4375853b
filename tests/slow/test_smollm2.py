"""Checks on the real embedded SmolLM2-135M-Instruct and the real wikitext-2 data (marked slow)."""

import json
from pathlib import Path

import pytest
import torch
from slow_cache import CPU_FP32, CPU_FP32_OVERRIDES, private_cache  # noqa: F401 (autouse fixture)

from conftest import SHARED_DATA
from peftlab.config.loading import load_config
from peftlab.model.loading import load_model, load_tokenizer, resolve_source
from peftlab.train.callbacks import read_log
from peftlab.train.recipe import train

pytestmark = pytest.mark.slow
WIKI = SHARED_DATA / "wikitext-2-raw-v1"


def test_embedded_model_is_converted_once_then_loaded_from_the_cache(private_cache, capsys):  # noqa: F811
    first = resolve_source(CPU_FP32)  # converts the GGUF unless an earlier test of this session did
    capsys.readouterr()
    source = resolve_source(CPU_FP32)
    assert "converting" not in capsys.readouterr().out  # the second time, the cached folder is used
    assert source == first
    folder = Path(source.path)
    assert folder.parent.resolve() == (private_cache / "models").resolve()
    assert (folder / "model.safetensors").is_file()
    assert json.loads((folder / "peftlab_source.json").read_text())["gguf"].endswith(".gguf")
    tokenizer = load_tokenizer(source, CPU_FP32)
    model = load_model(source, CPU_FP32, torch.device("cpu"), torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cpu", torch.float32)}
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")


def test_short_lora_run_on_wikitext_lowers_held_out_perplexity(tmp_path):
    cfg = load_config(
        None,
        [
            *CPU_FP32_OVERRIDES,
            f"data.train_path={WIKI / 'wiki.valid.raw'}",
            f"data.eval_path={WIKI / 'wiki.test.raw'}",
            "data.block_size=128",
            "data.max_train_tokens=4096",
            "data.max_eval_tokens=1024",
            "method.name=lora",
            "method.r=8",
            "method.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
            "train.batch_size=4",
            "train.lr=1e-3",
            "eval.window=256",
            "eval.stride=256",
            # the default ("auto") is a path relative to the working directory; name it from the repo
            f"eval.forgetting_path={WIKI / 'wiki.test.raw'}",
            f"output.dir={tmp_path}",
            "output.name=slow",
        ],
    )
    result = train(cfg, progress=False)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert (manifest["device"], manifest["dtype"]) == ("cpu", "float32")
    assert metrics["base_eval_cached"] is False  # this code scored the base, in this test's own cache
    assert metrics["train_steps"] == 8
    assert metrics["tuned"]["perplexity"] < metrics["base"]["perplexity"]
    # Single-batch losses vary with the batch's text; compare the halves of the run instead.
    losses = [r["loss"] for r in read_log(result.run_dir / "log.jsonl")]
    assert sum(losses[4:]) / 4 < sum(losses[:4]) / 4, losses
    # every run: forgetting on the general text (wikitext-2 test) and ten side-by-side answers
    assert metrics["forgetting"]["tokens"] == 4095
    assert metrics["forgetting"]["source"] == str(WIKI / "wiki.test.raw")
    rows = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(r["base"] and r["tuned"] for r in rows)
    assert "Paris" in rows[0]["base"]  # "What is the capital of France?" answered by the instruct model
