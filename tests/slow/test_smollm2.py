"""Checks on the real embedded SmolLM2-135M-Instruct and the real wikitext-2 data (marked slow)."""

import json
import time

import pytest
import torch

from conftest import SHARED_DATA
from peftlab.config.loading import load_config
from peftlab.config.sections import ModelConfig
from peftlab.model.loading import load_model, load_tokenizer, resolve_source
from peftlab.train.callbacks import read_log
from peftlab.train.recipe import train

pytestmark = pytest.mark.slow
WIKI = SHARED_DATA / "wikitext-2-raw-v1"


def test_embedded_model_loads_from_the_safetensors_cache_in_seconds():
    source = resolve_source(ModelConfig())  # converts the GGUF once, then reuses the cached folder
    started = time.perf_counter()
    source = resolve_source(ModelConfig())
    tokenizer = load_tokenizer(source, ModelConfig())
    model = load_model(source, ModelConfig(), torch.device("cpu"), torch.float32)
    assert time.perf_counter() - started < 15
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")


def test_short_lora_run_on_wikitext_lowers_held_out_perplexity(tmp_path):
    cfg = load_config(
        None,
        [
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
            f"output.dir={tmp_path}",
            "output.name=slow",
        ],
    )
    result = train(cfg, progress=False)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["train_steps"] == 8
    assert metrics["tuned"]["perplexity"] < metrics["base"]["perplexity"]
    # Single-batch losses vary with the batch's text; compare the halves of the run instead.
    losses = [r["loss"] for r in read_log(result.run_dir / "log.jsonl")]
    assert sum(losses[4:]) / 4 < sum(losses[:4]) / 4, losses
    # every run: forgetting on the default general text (wikitext-2 test) and ten side-by-side answers
    assert metrics["forgetting"]["tokens"] == 4095 and metrics["forgetting"]["source"].endswith(
        "wiki.test.raw"
    )
    rows = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(r["base"] and r["tuned"] for r in rows)
    assert "Paris" in rows[0]["base"]  # "What is the capital of France?" answered by the instruct model
