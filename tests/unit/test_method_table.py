"""One table, every method: the same checks for each registered method on a tiny llama.

Rows are the method configs of tests/method_table.py, which the estimator tests share. Each check goes through the project's own path: the registry's prepare,
the Trainer built by train.arguments.training_arguments (so GaLore, 8-bit AdamW and LoRA+ get the optimizer
they really train with), save_pretrained, and model.loading.load_model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import Trainer

from conftest import build_tiny_llama
from method_table import LABELS, METHOD_ROWS, ROW_IDS
from peftlab.config.loading import validate_config
from peftlab.config.run import RunConfig
from peftlab.methods import get_method, method_names
from peftlab.model.loading import ModelSource, load_model
from peftlab.model.structure import count_parameters, write_task_labels
from peftlab.train.arguments import training_arguments
from peftlab.train.trainer import (
    PeftlabTrainer,
    choose_loss,
    chunked_forward_loss,
    chunked_loss_agrees,
    output_head,
)


def test_every_registered_method_has_a_row():
    assert {row["name"] for row in METHOD_ROWS} == set(method_names())


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny64")
    build_tiny_llama(len(tiny_tokenizer), hidden_size=64).save_pretrained(path)
    return path


def has_head(cfg: RunConfig) -> bool:
    return get_method(cfg.method.name).head != "causal_lm"


def run_config(method: dict[str, Any], base_dir: Path, tmp_path: Path, **train: Any) -> RunConfig:
    head = get_method(method["name"]).head != "causal_lm"
    task = {"kind": "classification", "label_names": LABELS} if head else {}
    return validate_config(
        {
            "model": {"name": str(base_dir), "device": "cpu", "dtype": "float32"},
            "data": {"train_path": "unused", **task},
            "method": method,
            "train": {"lr": 1e-2, "max_steps": 1, "batch_size": 2, "lr_scheduler": "constant", **train},
            "output": {"dir": str(tmp_path)},
        }
    )


def load_base(cfg: RunConfig, base_dir: Path) -> Any:
    spec = get_method(cfg.method.name)
    options = spec.load_options(cfg.method, torch.float32) if spec.load_options else {}
    model = load_model(
        ModelSource(str(base_dir), "tiny"), cfg.model, torch.device("cpu"), torch.float32, options
    )
    write_task_labels(model, cfg.data.label_names, pad_id=0)  # as the training path does (no-op for text)
    return model


def untrained(cfg: RunConfig, base_dir: Path) -> Any:
    """The model a saved adapter loads onto: the base, or the spec's head model over it."""
    spec = get_method(cfg.method.name)
    base = load_base(cfg, base_dir)
    return spec.build_head(base, cfg.method) if spec.build_head else base


def prepared(cfg: RunConfig, base_dir: Path) -> torch.nn.Module:
    torch.manual_seed(0)  # adapters are initialised from the global RNG
    model = get_method(cfg.method.name).prepare(load_base(cfg, base_dir), cfg.method)
    if isinstance(model, PeftModel):
        # peft initialises adapters to the identity (LoRA's B = 0, IA3's vectors = 1); perturbing
        # them, as peft's own tests do, makes every equality check below able to fail.
        torch.manual_seed(1)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.1 * torch.randn_like(param))
    return model


def make_optimizer(cfg: RunConfig, model: torch.nn.Module, tmp_path: Path) -> torch.optim.Optimizer:
    spec = get_method(cfg.method.name)
    custom = spec.make_optimizer(model, cfg.method, cfg.train) if spec.make_optimizer else None
    trainer = Trainer(
        model=model,
        args=training_arguments(cfg, spec, tmp_path, torch.device("cpu"), torch.float32, progress=False),
        optimizers=(custom, None),
    )
    return trainer.create_optimizer()


def batch(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """Two rows of 16 tokens; labels are the tokens, or class indices [B] for a head model."""
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (2, 16))  # no pad id (0): a head reads the last position
    labels = torch.tensor([0, 2]) if has_head(cfg) else ids
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("method", METHOD_ROWS, ids=ROW_IDS)
def test_trainable_count_matches_peft_or_the_formula(method, base_dir, tmp_path):
    cfg = run_config(method, base_dir, tmp_path)
    model = prepared(cfg, base_dir)
    counts = count_parameters(model)
    if isinstance(model, PeftModel):
        assert (counts.trainable, counts.total) == tuple(model.get_nb_trainable_parameters())
    elif method["name"] == "freeze":
        layers = model.model.layers
        assert counts.trainable == sum(p.numel() for p in layers[-1].parameters())
    else:  # full and galore train every parameter
        assert counts.trainable == counts.total == sum(p.numel() for p in model.parameters())
    assert 0 < counts.trainable <= counts.total


@pytest.mark.parametrize("method", METHOD_ROWS, ids=ROW_IDS)
def test_one_step_changes_every_trainable_tensor_and_no_frozen_one(method, base_dir, tmp_path):
    cfg = run_config(method, base_dir, tmp_path)
    model = prepared(cfg, base_dir)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = make_optimizer(cfg, model, tmp_path)
    model(**batch(cfg)).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        same = torch.equal(param.detach(), before[name])
        if param.requires_grad:
            assert not same, f"trainable {name} did not change"
        else:
            assert same, f"frozen {name} changed"


@pytest.mark.parametrize("method", METHOD_ROWS, ids=ROW_IDS)
def test_loss_is_finite_and_goes_down_on_a_repeated_batch(method, base_dir, tmp_path):
    cfg = run_config(method, base_dir, tmp_path)
    model = prepared(cfg, base_dir)
    model.train()
    optimizer = make_optimizer(cfg, model, tmp_path)
    losses = []
    for _ in range(6):
        loss = model(**batch(cfg)).loss
        assert torch.isfinite(loss)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("method", METHOD_ROWS, ids=ROW_IDS)
def test_save_then_load_gives_identical_logits(method, base_dir, tmp_path):
    cfg = run_config(method, base_dir, tmp_path)
    spec = get_method(cfg.method.name)
    model = prepared(cfg, base_dir).eval()
    ids = batch(cfg)["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        base_logits = untrained(cfg, base_dir).eval()(input_ids=ids).logits
    model.save_pretrained(tmp_path / spec.artifact)
    if isinstance(model, PeftModel):
        reloaded = PeftModel.from_pretrained(untrained(cfg, base_dir), tmp_path / spec.artifact).eval()
    else:
        reloaded = load_model(
            ModelSource(str(tmp_path / spec.artifact), "saved"), cfg.model, torch.device("cpu"), torch.float32
        ).eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    assert torch.equal(got, expected)
    if method["name"] not in {"full", "freeze", "galore"}:  # untrained non-adapter methods equal the base
        assert not torch.allclose(expected[:, -ids.shape[1] :], base_logits), (
            "the adapter must change the output"
        )


@pytest.mark.parametrize("method", METHOD_ROWS, ids=ROW_IDS)
def test_chunked_loss_equals_the_models_own_loss_and_gradients(method, base_dir, tmp_path):
    cfg = run_config(method, base_dir, tmp_path)
    model = prepared(cfg, base_dir)
    if has_head(cfg):  # class logits, no LM head: the token loss never applies, nor is it checked
        assert output_head(model) is None and chunked_loss_agrees(model, batch(cfg))[0] is False
        assert choose_loss("auto", model, None, torch.device("cpu")) == "standard"  # type: ignore[arg-type]
        return
    model.train()
    inputs = batch(cfg)
    inputs["labels"] = inputs["labels"].clone()
    inputs["labels"][0, :6] = -100  # a prompt without loss
    assert chunked_loss_agrees(model, inputs) == (True, "")
    model.train()
    torch.manual_seed(3)  # the same dropout masks for both passes
    own = model(**inputs).loss
    own.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch.manual_seed(3)
    chunked, _ = chunked_forward_loss(model, inputs)
    chunked.backward()
    torch.testing.assert_close(chunked, own, rtol=1e-5, atol=1e-6)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and got
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


class GradientCapture:
    """Trainer callback that copies every trainable gradient just before the optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    def __getattr__(self, name: str) -> Any:  # every other callback event is a no-op
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


LORA = {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}


def accumulated_gradients(
    base_dir: Path,
    tmp_path: Path,
    batch_size: int,
    accumulation: int,
    chunked: bool = False,
    method: dict[str, Any] = LORA,
) -> dict[str, torch.Tensor]:
    from peftlab.data.class_rows import ClassCollator, ClassDataset
    from peftlab.data.packing import BlockDataset, group_per_document

    # Documents of very different lengths: per-micro-batch loss averaging would weight them wrongly.
    docs = [list(range(3, 3 + n)) for n in (15, 3, 9, 6)]
    cfg = run_config(
        method, base_dir, tmp_path, batch_size=batch_size, grad_accum_steps=accumulation, max_grad_norm=0
    )
    if has_head(cfg):  # one class index per document, right-padded batches (as data/class_rows.py builds)
        dataset: Any = ClassDataset([(doc, label) for doc, label in zip(docs, [0, 2, 1, 2], strict=True)])
        collator: Any = ClassCollator(pad_id=0)
    else:
        dataset, collator = BlockDataset(group_per_document(docs, block_size=16, eos_id=2, pad_id=0)), None
    model = prepared(cfg, base_dir)
    capture = GradientCapture()
    trainer = PeftlabTrainer(
        model=model,
        args=training_arguments(
            cfg, get_method(cfg.method.name), tmp_path, torch.device("cpu"), torch.float32, progress=False
        ),
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[capture],  # type: ignore[list-item]
        chunked_loss=chunked,
    )
    trainer.train()
    return capture.grads


HEAD = {"name": "classification_head", "r": 4, "target_modules": ["q_proj", "v_proj"]}


@pytest.mark.parametrize(
    ("chunked", "method"),
    [(False, LORA), (True, LORA), (False, HEAD)],
    ids=["model-loss", "chunked-loss", "classification-head"],
)
def test_gradient_accumulation_is_exact(base_dir, tmp_path, chunked, method):
    """4 micro-batches of 1 give the gradients of 1 batch of 4 with the same tokens: the loss is
    normalised by the real target tokens (a head: the examples) across the accumulated micro-batches."""
    one_big = accumulated_gradients(base_dir, tmp_path / "a", 4, 1, chunked, method)
    four_small = accumulated_gradients(base_dir, tmp_path / "b", 1, 4, chunked, method)
    assert one_big.keys() == four_small.keys() and one_big
    # A head's batch of 4 is right-padded (the blocks are all 16 long): attention runs on other
    # shapes, which moves float rounding (~2e-7); a per-micro-batch mean would be off by 4x.
    atol = 1e-6 if method is HEAD else 1e-7
    for name, grad in one_big.items():
        torch.testing.assert_close(four_small[name], grad, rtol=1e-5, atol=atol, msg=name)


def test_llama_3_2_1b_lora_count_on_the_meta_device():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    cfg = validate_config({"data": {"train_path": "x"}, "method": {"name": "lora", "r": 8}}).method
    model = get_method("lora").prepare(model, cfg)
    assert (
        count_parameters(model).line()
        == "trainable params: 1,703,936 || all params: 1,237,518,336 || trainable%: 0.1377"
    )


def test_hybrid_projects_exactly_the_mlp_copies_and_lora_trains_attention(base_dir, tmp_path):
    cfg = run_config({"name": "lora_galore", "r": 4, "rank": 4}, base_dir, tmp_path)
    model = prepared(cfg, base_dir)
    optimizer = make_optimizer(cfg, model, tmp_path)
    projected = [g for g in optimizer.param_groups if "rank" in g]
    assert len(projected) == 1 and projected[0]["rank"] == 4
    names = {id(p): n for n, p in model.named_parameters()}
    projected_names = sorted(names[id(p)] for p in projected[0]["params"])
    assert len(projected_names) == 2 * 3  # 2 layers x (gate, up, down)
    assert all(".mlp." in n and n.endswith("modules_to_save.default.weight") for n in projected_names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {n for n in trainable if "lora_" in n} and set(trainable) - set(projected_names) == {
        n for n in trainable if "lora_" in n
    }
