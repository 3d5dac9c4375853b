"""classification_head's parts: the head model shares the loaded body, the (prompt, class) rows and
their collator, argmax scoring batched like one at a time, the estimate on the meta device."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Literal

import pytest
import torch

from conftest import build_tiny_llama
from peftlab.config.loading import validate_config
from peftlab.config.sections import DataConfig
from peftlab.data.class_rows import ClassCollator, ClassDataset, tokenize_classes
from peftlab.errors import ConfigError, DataError
from peftlab.evaluation.classification import head_predictions
from peftlab.methods import get_method
from peftlab.methods.lora import LoraConfig
from peftlab.methods.registry import MethodSpec, register_method
from peftlab.model.structure import is_sequence_classifier, write_task_labels
from peftlab.sizing.estimate import estimate_memory

LABELS = ["neg", "neutral", "pos"]


def method_cfg(**extra: Any) -> Any:
    raw = {
        "data": {"train_path": "x", "kind": "classification", "label_names": LABELS},
        "method": {"name": "classification_head", "r": 4, **extra},
    }
    return validate_config(raw)


def head_model(tokenizer: Any, seed: int = 0) -> tuple[Any, Any]:
    causal = build_tiny_llama(len(tokenizer))
    write_task_labels(causal, LABELS, pad_id=tokenizer.pad_token_id)
    spec = get_method("classification_head")
    assert spec.build_head is not None
    return causal, spec.build_head(causal, method_cfg(head_seed=seed).method)


def test_the_head_model_shares_the_loaded_body_and_has_a_seeded_head(tiny_tokenizer):
    causal, model = head_model(tiny_tokenizer)
    assert type(model).__name__ == "LlamaForSequenceClassification" and is_sequence_classifier(model)
    assert model.model is causal.model  # the same modules: no second copy of the weights
    assert not any(p.is_meta for p in model.parameters())
    assert model.score.weight.shape == (len(LABELS), causal.config.hidden_size)
    assert model.config.id2label == dict(enumerate(LABELS)) and model.config.num_labels == 3
    assert model.config.pad_token_id == tiny_tokenizer.pad_token_id
    _, again = head_model(tiny_tokenizer)
    _, other = head_model(tiny_tokenizer, seed=1)
    assert torch.equal(again.score.weight, model.score.weight)
    assert not torch.equal(other.score.weight, model.score.weight)
    std = model.score.weight.std().item()
    assert 0.5 * causal.config.initializer_range < std < 2 * causal.config.initializer_range


def test_linear_probe_trains_the_head_only(tiny_tokenizer):
    causal = build_tiny_llama(len(tiny_tokenizer))
    write_task_labels(causal, LABELS, pad_id=0)
    model = get_method("classification_head").prepare(causal, method_cfg(head_only=True).method)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["base_model.model.score.modules_to_save.default.weight"]
    with pytest.raises(ConfigError, match=r"head_only needs method\.init=default"):
        method_cfg(head_only=True, init="pissa")


def test_a_head_spec_needs_a_head_builder():
    class HeadlessConfig(LoraConfig):
        name: Literal["headless"] = "headless"  # type: ignore[assignment]

    lora = get_method("lora")
    with pytest.raises(ValueError, match="no build_head"):
        register_method(MethodSpec(HeadlessConfig, lora.prepare, "x", head="sequence_classification"))


def test_rows_are_prompt_ids_and_class_index_right_padded(tiny_tokenizer):
    cfg = DataConfig(train_path="x", kind="classification", max_seq_len=16)
    records = [{"text": "the cat", "label": "pos"}, {"text": "a dog sat on the log " * 4, "label": "neg"}]
    counts: Counter[str] = Counter()
    rows = tokenize_classes(records, LABELS, cfg, tiny_tokenizer, counts)
    prompt = tiny_tokenizer("the cat\nAnswer:", add_special_tokens=False)["input_ids"]
    assert rows[0] == (prompt, 2) and len(rows[1][0]) == 16 and rows[1][1] == 0
    assert counts["truncated"] == 1
    batch = ClassCollator(pad_id=0, tally_key="t")([ClassDataset(rows)[0], ClassDataset(rows)[1]])
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [2, 0]
    assert batch["input_ids"].shape == (2, 16) and batch["input_ids"][0, len(prompt) :].eq(0).all()
    assert batch["attention_mask"].sum(1).tolist() == [len(prompt), 16]
    assert batch["t"] == (len(prompt) + 16, 16 - len(prompt))
    with pytest.raises(DataError, match=r"labels \['maybe'\] are not in the label set"):
        tokenize_classes([{"text": "x", "label": "maybe"}], LABELS, cfg, tiny_tokenizer, counts)


def test_head_predictions_batched_equal_one_at_a_time(tiny_tokenizer):
    _, model = head_model(tiny_tokenizer)
    model.eval()
    prompts = ["The cat sat.", "A dog", "Numbers like 1 2 3 4 5 appear in text.", "fox", "The mat."]
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    batched = head_predictions(model, tiny_tokenizer, prompts, LABELS, batch_size=2)
    assert len(calls) == math.ceil(len(prompts) / 2)  # one forward per example, batched
    for prompt, predicted in zip(prompts, batched, strict=True):
        ids = torch.tensor([tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            assert model(input_ids=ids).logits.argmax(-1).item() == predicted
    assert head_predictions(model, tiny_tokenizer, prompts, LABELS, batch_size=1) == batched
    with pytest.raises(ValueError, match="are not the task's"):
        head_predictions(model, tiny_tokenizer, prompts, ["a", "b"], batch_size=2)


@pytest.mark.parametrize("label_names", [LABELS, None], ids=["labels-known", "labels-unknown"])
def test_the_estimate_runs_on_the_meta_device(tiny_tokenizer, label_names):
    config = build_tiny_llama(len(tiny_tokenizer)).config
    data = {"train_path": "x", "kind": "classification", "label_names": label_names, "max_seq_len": 16}
    method = {"name": "classification_head", "r": 4, "target_modules": ["q_proj", "o_proj"]}
    cfg = validate_config({"data": data, "method": method})
    memory = estimate_memory(cfg, config, torch.float32, overhead=0)
    lora = 2 * 2 * 4 * (32 + 32)  # q_proj, o_proj (32 -> 32) in 2 layers, r=4
    labels = len(label_names) if label_names else 2  # the config default when the data has not said
    assert memory.trainable_params == lora + labels * 32
    assert memory.activations > 0 and memory.loss_working_set == 0
