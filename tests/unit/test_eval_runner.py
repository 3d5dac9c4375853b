"""evaluation/inputs.py, runner.py, base_cache.py: the evaluation each data kind gets, forgetting,
samples, the base cache."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from conftest import EVAL_TEXT, build_tiny_llama
from peftlab.config.loading import validate_config
from peftlab.data.task import build_task_data
from peftlab.errors import DataError
from peftlab.evaluation import base_cache
from peftlab.evaluation.base_cache import evaluate_base
from peftlab.evaluation.base_vs_tuned import write_samples
from peftlab.evaluation.generation import generate_greedy
from peftlab.evaluation.inputs import build_eval_inputs, first_tokens, general_text
from peftlab.evaluation.runner import compare_sides, evaluate_model

CHAT = [
    {
        "messages": [
            {"role": "user", "content": f"Name fox number {i}."},
            {"role": "assistant", "content": f"The quick brown fox {i}."},
        ]
    }
    for i in range(12)
]


def scrambled(model: torch.nn.Module, seed: int, std: float = 0.5) -> torch.nn.Module:
    """Large random weights: the tiny llama then writes varied tokens instead of newlines only."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model.eval()


def config_for(kind: str, base: dict, tmp_path, **eval_settings):
    general = tmp_path / "general.txt"
    general.write_text(EVAL_TEXT * 3)
    raw = {**base, "eval": {**base["eval"], "forgetting_path": str(general), **eval_settings}}
    if kind == "classification":
        path = tmp_path / "cls.tsv"
        path.write_text("".join(f"the dog sat {i}\t{i % 2}\n" for i in range(30)))
        raw["data"] = {
            "kind": "classification",
            "train_path": str(path),
            "header": False,
            "label_names": ["negative", "positive"],
            "test_fraction": 0.3,
            "max_seq_len": 64,
        }
    elif kind == "chat":
        path = tmp_path / "chat.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
        raw["data"] = {"kind": "chat", "train_path": str(path), "test_fraction": 0.5, "max_seq_len": 96}
    return validate_config(raw)


def inputs_for(cfg, tokenizer):
    return build_eval_inputs(cfg, tokenizer, build_task_data(cfg.data, tokenizer, cfg.train.seed))


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.mark.parametrize("kind", ["text", "classification", "chat"])
def test_each_data_kind_gets_its_evaluation(kind, tiny_run_config, tiny_tokenizer, tiny_model, tmp_path):
    cfg = config_for(kind, tiny_run_config, tmp_path, max_examples=4)
    inputs = inputs_for(cfg, tiny_tokenizer)
    out = evaluate_model(tiny_model, tiny_tokenizer, cfg, inputs, "base", progress=False)
    expected = {"kind", "general_text", "sample_answers"}
    expected |= {
        "text": {"perplexity", "token_accuracy", "mean_nll", "units"},
        "classification": {"classification"},
        "chat": {"generation"},
    }[kind]
    assert expected <= set(out)
    assert out["kind"] == kind
    assert ("classification" in out) == (kind == "classification")
    assert ("generation" in out) == (kind == "chat")
    assert ("perplexity" in out) == (kind == "text")  # no data.eval_path in the other two
    general = out["general_text"]
    assert general["tokens"] == len(inputs.general.ids) - 1 and finite(general["mean_nll"])
    assert len(out["sample_answers"]) == len(cfg.eval.sample_prompts) == 2
    if kind == "text":
        assert finite(out["perplexity"]) and 0 <= out["token_accuracy"] <= 1
        assert finite(out["units"]["bits_per_byte"])
    if kind == "classification":
        cls = out["classification"]
        assert cls["examples"] == 4 == sum(map(sum, cls["confusion_matrix"]))
        assert cls["labels"] == ["negative", "positive"]
        assert 0 <= cls["accuracy"] <= 1 and 0 <= cls["macro_f1"] <= 1
        assert set(cls["per_class"]) == {"negative", "positive"}
    if kind == "chat":
        gen = out["generation"]
        assert gen["examples"] == 4 and gen["max_new_tokens"] == 8 and gen["decoding"] == "greedy"
        assert all(finite(gen[k]) for k in ("bleu4", "rouge_l", "answer_nll", "answer_perplexity"))
        assert gen["answer_tokens"] == sum(len(item.answer_ids) for item in inputs.chat)
        assert gen["answer_perplexity"] == pytest.approx(math.exp(gen["answer_nll"]))


def test_chat_prompt_and_reference_split_the_training_rendering(tiny_run_config, tiny_tokenizer, tmp_path):
    cfg = config_for("chat", tiny_run_config, tmp_path)
    item = inputs_for(cfg, tiny_tokenizer).chat[0]
    prompt = tiny_tokenizer.decode(item.prompt_ids)
    answer = tiny_tokenizer.decode(item.answer_ids)
    assert prompt.endswith("<|im_start|>assistant\n") and prompt.startswith("<|im_start|>user\n")
    assert answer == item.reference + "<|im_end|>"  # the reply and its end-of-turn token, as trained


def test_classification_predicts_the_label_with_the_higher_loglikelihood(
    tiny_run_config, tiny_tokenizer, tmp_path
):
    cfg = config_for("classification", tiny_run_config, tmp_path, max_examples=3)
    inputs = inputs_for(cfg, tiny_tokenizer)
    model = scrambled(build_tiny_llama(len(tiny_tokenizer)), seed=1)
    out = evaluate_model(model, tiny_tokenizer, cfg, inputs, "base", progress=False)["classification"]
    predicted = []
    for prompt in inputs.class_prompts:  # by hand: sum of log-probs of each label's tokens
        p_ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        scores = []
        for label in inputs.label_names:
            l_ids = tiny_tokenizer(" " + label, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(torch.tensor([p_ids + l_ids])).logits[0], -1)
            scores.append(sum(logp[len(p_ids) - 1 + j, t].item() for j, t in enumerate(l_ids)))
        predicted.append(inputs.label_names[max(range(len(scores)), key=scores.__getitem__)])
    hits = sum(p == g for p, g in zip(predicted, inputs.class_gold, strict=True))
    assert out["accuracy"] == pytest.approx(hits / 3)


def test_a_head_model_is_scored_by_its_class_logits_and_says_what_it_skips(
    tiny_run_config, tiny_tokenizer, tiny_model, text_files, tmp_path
):
    from peftlab.methods import get_method
    from peftlab.model.structure import NO_LM_HEAD, write_task_labels

    cfg = config_for("classification", tiny_run_config, tmp_path, max_examples=4)
    cfg.data.eval_path = str(text_files[1])  # held-out text too: the base scores it, the head cannot
    inputs = inputs_for(cfg, tiny_tokenizer)
    base = evaluate_model(tiny_model, tiny_tokenizer, cfg, inputs, "base", progress=False)
    spec = get_method("classification_head")
    causal = build_tiny_llama(len(tiny_tokenizer))
    write_task_labels(causal, inputs.label_names, pad_id=tiny_tokenizer.pad_token_id)
    assert spec.build_head is not None
    head = spec.build_head(
        causal, validate_config({**cfg.model_dump(), "method": {"name": spec.name}}).method
    )
    tuned = evaluate_model(head, tiny_tokenizer, cfg, inputs, "tuned", progress=False)
    assert "perplexity" in base and "mean_nll" in base["general_text"]
    assert base["classification"]["scoring"] == "label log-likelihood (sum)"
    cls = tuned["classification"]
    assert cls["scoring"] == "classification head (argmax of class logits)" and cls["examples"] == 4
    assert set(cls) == set(base["classification"])  # the same metrics, defined once
    assert "perplexity" not in tuned and tuned["general_text"] == {"skipped": NO_LM_HEAD}
    assert tuned["skipped"] == dict.fromkeys(("held_out_text", "general_text", "sample_answers"), NO_LM_HEAD)
    forgetting, rows = compare_sides(base, tuned, inputs)
    assert forgetting == {"skipped": NO_LM_HEAD} and rows == []


def test_forgetting_is_tuned_minus_base_cross_entropy_by_hand(tiny_run_config, tiny_tokenizer, tmp_path):
    cfg = config_for("text", tiny_run_config, tmp_path, window=64, stride=64, forgetting_max_tokens=40)
    inputs = inputs_for(cfg, tiny_tokenizer)
    ids = torch.tensor([inputs.general.ids])  # [1, 40]: one window scores every token
    assert ids.shape == (1, 40)
    base, tuned = build_tiny_llama(len(tiny_tokenizer), seed=0), build_tiny_llama(len(tiny_tokenizer), seed=1)

    def cross_entropy(model) -> float:
        logits = model(ids).logits[0, :-1]  # [39, V]
        return torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()

    b = evaluate_model(base, tiny_tokenizer, cfg, inputs, "base", progress=False)
    t = evaluate_model(tuned, tiny_tokenizer, cfg, inputs, "tuned", progress=False)
    result, _ = compare_sides(b, t, inputs)
    assert result["tokens"] == 39 and result["source"] == str(tmp_path / "general.txt")
    assert result["base_ce"] == pytest.approx(cross_entropy(base), abs=1e-5)
    assert result["forgetting"] == pytest.approx(cross_entropy(tuned) - cross_entropy(base), abs=1e-5)
    assert result["forgetting"] != 0


def test_sample_answers_are_greedy_chat_answers_written_side_by_side(
    tiny_run_config, tiny_tokenizer, tmp_path
):
    cfg = config_for("text", tiny_run_config, tmp_path)
    inputs = inputs_for(cfg, tiny_tokenizer)
    base = scrambled(build_tiny_llama(len(tiny_tokenizer)), seed=1)
    tuned = scrambled(build_tiny_llama(len(tiny_tokenizer)), seed=2)
    b = evaluate_model(base, tiny_tokenizer, cfg, inputs, "base", progress=False)
    t = evaluate_model(tuned, tiny_tokenizer, cfg, inputs, "tuned", progress=False)
    _, rows = compare_sides(b, t, inputs)
    assert "sample_answers" not in b and "sample_answers" not in t
    for row, prompt in zip(rows, cfg.eval.sample_prompts, strict=True):
        text = tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        for side, model in (("base", base), ("tuned", tuned)):
            want = tiny_tokenizer.decode(
                generate_greedy(model, tiny_tokenizer, [ids], 8)[0], skip_special_tokens=True
            )
            assert row["prompt"] == prompt and row[side] == want.strip() and row[side]
    assert rows[0]["base"] != rows[0]["tuned"]
    write_samples(
        tmp_path, [r["prompt"] for r in rows], [r["base"] for r in rows], [r["tuned"] for r in rows]
    )
    assert [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == rows
    md = (tmp_path / "samples.md").read_text()
    assert all(r["prompt"] in md and r["base"] in md and r["tuned"] in md for r in rows)


def test_base_cache_hit_on_second_call_and_miss_when_a_setting_changes(
    tiny_run_config, tiny_tokenizer, tiny_model, tmp_path, monkeypatch, capsys
):
    calls = []
    real = base_cache.evaluate_model

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(base_cache, "evaluate_model", counting)
    identity = {"fingerprint": "abc", "dtype": "float32", "load_options": {}}
    # one window holds the whole held-out text and the whole general text: each is one plain forward
    cfg = config_for("text", tiny_run_config, tmp_path, window=256, stride=256)
    inputs = inputs_for(cfg, tiny_tokenizer)
    first, hit1 = evaluate_base(tiny_model, tiny_tokenizer, cfg, inputs, identity, progress=False)
    second, hit2 = evaluate_base(tiny_model, tiny_tokenizer, cfg, inputs, identity, progress=False)
    assert (hit1, hit2, len(calls)) == (False, True, 1)
    assert "base evaluation: reusing cached result" in capsys.readouterr().out
    assert second == first  # JSON keeps every float exactly
    # and what the cache gives back is this model's score, computed here without peftlab
    for ids, got in ((inputs.lm.ids, second), (inputs.general.ids, second["general_text"])):
        assert 2 < len(ids) <= 256
        with torch.no_grad():
            logits = tiny_model(torch.tensor([ids])).logits[0, :-1]  # [N-1, V] predicts ids[1:]
        targets = torch.tensor(ids[1:])
        nll = torch.nn.functional.cross_entropy(logits, targets).item()
        assert got["tokens"] == len(ids) - 1
        assert got["mean_nll"] == pytest.approx(nll, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
        assert got["correct"] == int((logits.argmax(-1) == targets).sum())

    changed = config_for("text", tiny_run_config, tmp_path, max_new_tokens=4)
    _, hit = evaluate_base(
        tiny_model, tiny_tokenizer, changed, inputs_for(changed, tiny_tokenizer), identity, progress=False
    )
    assert not hit and len(calls) == 2
    four_bit = {**identity, "load_options": {"quantization_config": {"load_in_4bit": True}}}
    _, hit = evaluate_base(tiny_model, tiny_tokenizer, cfg, inputs, four_bit, progress=False)
    assert not hit and len(calls) == 3
    off = config_for("text", tiny_run_config, tmp_path, cache=False)
    _, hit = evaluate_base(tiny_model, tiny_tokenizer, off, inputs, identity, progress=False)
    assert not hit and len(calls) == 4


def test_forgetting_text_default_missing_is_skipped_with_a_reason(
    tiny_run_config, tiny_tokenizer, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the default ../shared/data/... does not exist from here
    cfg = validate_config(tiny_run_config).eval
    assert cfg.forgetting_path == "auto"
    data, reason = general_text(cfg, tiny_tokenizer)
    assert data is None and "not found" in reason and "eval.forgetting_path" in reason
    assert general_text(cfg.model_copy(update={"forgetting_path": None}), tiny_tokenizer) == (
        None,
        "eval.forgetting_path is null",
    )
    with pytest.raises(DataError, match=re.escape("eval.forgetting_path: file not found: /no/such.txt")):
        general_text(cfg.model_copy(update={"forgetting_path": "/no/such.txt"}), tiny_tokenizer)
    raw = {**tiny_run_config, "eval": {**tiny_run_config["eval"], "forgetting_path": "auto"}}
    run_cfg = validate_config(raw)
    inputs = inputs_for(run_cfg, tiny_tokenizer)
    result, _ = compare_sides({}, {}, inputs)
    assert result == {"skipped": reason}


def test_first_tokens_equals_the_prefix_of_the_full_tokenisation(tiny_tokenizer):
    text = EVAL_TEXT * 40
    full = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    for n in (2, 50, 333, len(full), len(full) + 10):
        assert first_tokens(tiny_tokenizer, text, n) == full[:n]
