"""The estimator (sizing/estimate.py, sizing/plan.py): exact parameter, gradient and optimizer bytes against the
measured ones on a tiny model, activations against a real traced forward, no weights or network
needed, and the fit / refuse behaviour of `peftlab train`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Trainer

from method_table import LABELS, METHOD_ROWS, ROW_IDS
from peftlab.config.loading import validate_config
from peftlab.config.run import RunConfig
from peftlab.errors import FitError
from peftlab.methods import get_method
from peftlab.model.loading import ModelSource, load_model
from peftlab.model.structure import write_task_labels
from peftlab.sizing.estimate import MemoryEstimate, _activation_bytes, estimate_memory
from peftlab.sizing.plan import flops_per_token, plan
from peftlab.sizing.resources import gradient_bytes, optimizer_state_bytes, parameter_bytes
from peftlab.train.arguments import training_arguments
from peftlab.train.recipe import train

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "configs"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    from conftest import build_tiny_llama

    path = tmp_path_factory.mktemp("tiny64-estimate")
    build_tiny_llama(len(tiny_tokenizer), hidden_size=64).save_pretrained(path)
    return path


def task_of(method: dict[str, Any]) -> dict[str, Any]:
    """A classification task for a method whose spec has a classification head."""
    head = get_method(method["name"]).head != "causal_lm"
    return {"kind": "classification", "label_names": LABELS, "max_seq_len": 16} if head else {}


def run_config(method: dict[str, Any], base_dir: Path, **train: Any) -> RunConfig:
    return validate_config(
        {
            "model": {"name": str(base_dir), "device": "cpu", "dtype": "float32"},
            "data": {"train_path": "unused", "block_size": 16, **task_of(method)},
            "method": method,
            "train": {"batch_size": 2, "max_steps": 1, **train},
        }
    )


def measured(cfg: RunConfig, base_dir: Path, tmp_path: Path) -> dict[str, int]:
    """One real training step with the run's own optimizer; the bytes as sizing/resources.py measures them."""
    spec = get_method(cfg.method.name)
    options = spec.load_options(cfg.method, torch.float32)
    model = load_model(
        ModelSource(str(base_dir), "tiny"), cfg.model, torch.device("cpu"), torch.float32, options
    )
    head = spec.head != "causal_lm"
    if head:
        write_task_labels(model, LABELS)  # as the training path does, before the head is built
    model = spec.prepare(model, cfg.method)
    model.train()
    custom = spec.make_optimizer(model, cfg.method, cfg.train)
    trainer = Trainer(
        model=model,
        args=training_arguments(cfg, spec, tmp_path, torch.device("cpu"), torch.float32, progress=False),
        optimizers=(custom, None),
    )
    optimizer = trainer.create_optimizer()
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2]) if head else ids  # class indices for a head, tokens otherwise
    model(input_ids=ids, labels=labels).loss.backward()
    grads = gradient_bytes(model)
    optimizer.step()
    return {
        "weights": parameter_bytes(model) + quantisation_constant_bytes(model),
        "trainable_bytes": parameter_bytes(model, trainable_only=True),
        "gradients": grads,
        "optimizer_state": optimizer_state_bytes(optimizer),
    }


def quantisation_constant_bytes(model: torch.nn.Module) -> int:
    """bitsandbytes' per-block absmax of every 4-bit weight (and, with double quantisation, the
    fp32 absmax of those), read from the loaded weights' quant_state."""
    total = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total


@pytest.mark.parametrize("method", METHOD_ROWS, ids=ROW_IDS)
def test_parameter_gradient_and_optimizer_bytes_equal_the_measured_ones(method, base_dir, tmp_path):
    cfg = run_config(method, base_dir)
    from transformers import AutoConfig

    estimate = estimate_memory(cfg, AutoConfig.from_pretrained(base_dir), torch.float32, overhead=0)
    truth = measured(cfg, base_dir, tmp_path)
    assert truth["optimizer_state"] > 0 and truth["gradients"] > 0
    assert estimate.weights == truth["weights"]
    assert estimate.trainable_bytes == truth["trainable_bytes"]
    assert estimate.gradients == truth["gradients"]
    assert estimate.optimizer_state == truth["optimizer_state"]


def test_quantised_weights_are_counted_at_four_bits(base_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir)
    lora = estimate_memory(run_config({"name": "lora", "r": 4}, base_dir), config, torch.float32, 0)
    qlora = estimate_memory(run_config({"name": "qlora", "r": 4}, base_dir), config, torch.float32, 0)
    assert qlora.trainable_bytes == lora.trainable_bytes
    assert qlora.weights < lora.weights
    # Decoder linear weights: 4 layers' q,k,v,o + gate,up,down at hidden 64 (k,v are 64x32).
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3
    n = 2 * per_layer
    blocks = n // 64
    expected_saving = n * 4 - (n // 2 + blocks + 4 * -(-blocks // 256))
    # Double quantisation: 1 byte per 64-value block + an fp32 per 256 blocks (per layer, rounded up).
    assert abs((lora.weights - qlora.weights) - expected_saving) <= 4 * 14


@pytest.mark.parametrize("recompute_norms", [False, True])
def test_traced_activations_equal_a_real_forward_on_this_cpu(base_dir, recompute_norms):
    """The meta-device trace (with fused attention) keeps the same bytes as a real CPU forward,
    with and without the norm outputs rebuilt in backward (model/norm_recompute.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import saved_activation_bytes
    from peftlab.model.norm_recompute import NormRecompute, layer_norms
    from peftlab.model.structure import decoder_layers

    config = AutoConfig.from_pretrained(base_dir)
    cfg = run_config({"name": "lora", "r": 4, "dropout": 0.0}, base_dir)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    meta = get_method("lora").prepare(meta, cfg.method)
    traced, checkpointed = _activation_bytes(meta, 2, 16, recompute_norms)
    # under checkpointing the layer rerun in backward runs under the checkpoint's hooks, not ours
    assert checkpointed == _activation_bytes(meta, 2, 16, False)[1]

    real = get_method("lora").prepare(AutoModelForCausalLM.from_pretrained(base_dir), cfg.method).train()
    recompute = NormRecompute(layer_norms(decoder_layers(real) or [])) if recompute_norms else None
    ids = torch.randint(3, 300, (2, 16))
    kept = saved_activation_bytes(real, recompute, input_ids=ids, logits_to_keep=1, output_hidden_states=True)
    assert traced == kept
    if recompute_norms:  # layer 1 of 2 no longer keeps its input norm's output for q/k/v's adapters
        hidden = config.hidden_size
        assert saved_activation_bytes(
            real, input_ids=ids, logits_to_keep=1, output_hidden_states=True
        ) - kept == (2 * 16 * hidden * 4)


def test_flops_per_token_by_hand():
    memory = MemoryEstimate(
        batch_size=1, seq_len=10, dtype="float32", weights=0, trainable_params=0, trainable_bytes=0,
        gradients=0, optimizer_state=0, activations=0, activations_checkpointed=0, loss_working_set=0,
        overhead=0, gradient_checkpointing=False, total_params=100, matmul_params=100,
        trainable_matmul_params=30, attention_width=4,
    )  # fmt: skip
    # forward 2*100 + 4*10*4 = 360; backward 2*100 + 2*30 + 8*10*4 = 580
    assert flops_per_token(memory, gradient_checkpointing=False) == 940
    assert flops_per_token(memory, gradient_checkpointing=True) == 940 + 360


def test_a_run_that_does_not_fit_is_refused_with_the_knob_to_turn(tiny_run_config, monkeypatch):
    cfg = validate_config(tiny_run_config)
    monkeypatch.setattr("peftlab.sizing.plan.framework_overhead", lambda gpu: 0)
    from transformers import AutoConfig

    need = plan(cfg, AutoConfig.from_pretrained(tiny_run_config["model"]["name"])).memory
    # A "device" a little smaller than the run: it fits only with gradient checkpointing.
    capacity = need.total - (need.activations - need.activations_checkpointed) // 2
    monkeypatch.setattr("peftlab.sizing.plan.device_capacity", lambda gpu: ("cpu", capacity, 1e9, "test"))
    with pytest.raises(
        FitError, match=r"this run needs about .* but cpu has .*: set train.gradient_checkpointing=true"
    ):
        train(cfg, progress=False)
    assert not list(Path(tiny_run_config["output"]["dir"]).glob("**/metrics.json"))
    result = train(cfg, progress=False, force=True)
    assert result.status == "completed"
    measured_split = result.metrics["memory_split"]
    assert measured_split["optimizer_state_bytes"] == result.metrics["estimate"]["optimizer_state"]
    assert measured_split["gradient_bytes"] == result.metrics["estimate"]["gradients"]


def test_estimate_command_needs_no_weights_and_no_network(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PEFTLAB_CACHE": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "peftlab.cli", "estimate", "--model", str(FIXTURES / "llama-3.2-1b.json"),
         "--method", "lora", "method.r=8", "method.target_modules=[q_proj,k_proj,v_proj,o_proj]",
         "--gpu", "t4"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "trainable parameters" in out.stdout and "1,703,936" in out.stdout
    assert "T4 (15 GB)" in out.stdout and "fits" in out.stdout
    assert not list(tmp_path.rglob("*.safetensors"))


@pytest.mark.parametrize("name", ["llama-3.2-1b", "mistral-7b", "gemma-7b"])
def test_published_architectures_give_their_parameter_counts(name):
    from transformers import AutoConfig

    expected = {"llama-3.2-1b": 1_235_814_400, "mistral-7b": 7_241_732_096, "gemma-7b": 8_537_680_896}
    cfg = validate_config(
        {
            "model": {"name": str(FIXTURES / f"{name}.json")},
            "data": {"train_path": "x"},
            "method": {"name": "full"},
        }
    )
    result = plan(cfg, AutoConfig.from_pretrained(FIXTURES / f"{name}.json"), gpu="4090")
    assert result.memory.total_params == expected[name]
    # Full training in bf16 with AdamW: weights 2 bytes, gradients 2, AdamW 4 per parameter.
    assert result.memory.weights >= 2 * expected[name]
    assert result.memory.optimizer_state >= 4 * expected[name]
    assert not result.fits or name == "llama-3.2-1b"


def test_release_memory_auto_releases_only_when_glibc_retention_would_not_fit(base_dir):
    from types import SimpleNamespace

    from peftlab.sizing.plan import GLIBC_RETENTION, must_release_memory

    def plan_of(total: int, capacity: int) -> Any:
        return SimpleNamespace(memory=SimpleNamespace(total=total), capacity=capacity)

    assert must_release_memory(True, plan_of(1, 100)) is True
    assert must_release_memory(False, plan_of(100, 100)) is False
    assert must_release_memory("auto", plan_of(100, int(100 * GLIBC_RETENTION) + 1)) is False
    assert must_release_memory("auto", plan_of(100, int(100 * GLIBC_RETENTION) - 1)) is True
    assert must_release_memory("auto", None) is True  # resumed runs are not re-estimated
