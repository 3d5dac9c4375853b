"""Which evaluation for which data kind: the one entry point for training and `peftlab eval`.

`build_eval_inputs` turns the config and the held-out data into fixed inputs (token ids, prompts,
references) once; `evaluate_model` scores one model on them, base and tuned alike:

- held-out text (data.eval_path; required for kind text): token perplexity, token accuracy, word and
  byte perplexity, bits per byte (suite.evaluate_lm), at the top level of the result;
- kind classification: each label's completion log-likelihood (a model with a classification head:
  the argmax of its class logits) -> accuracy, macro-F1, per-class precision/recall, confusion
  matrix, under "classification";
- kind chat: greedy answers from the chat template's generation prompt (batched, left padding) ->
  BLEU-4, ROUGE-L, plus the loss and perplexity of the reference answers, under "generation";
- every kind: cross-entropy on a general text under "general_text" (forgetting = tuned - base) and
  the greedy answers to eval.sample_prompts under "sample_answers".

`evaluate_base` caches the base result in $PEFTLAB_CACHE/evals/<key>.json, key = hash(model identity,
evaluation inputs, evaluation settings). Nothing here looks at the fine-tuning method (a head model
is recognised by the model itself: heads.is_sequence_classifier).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftlab.config import DEFAULT_FORGETTING_TEXT, EvalConfig, RunConfig
from peftlab.data.lm import build_eval_tokens
from peftlab.data.task import TaskData
from peftlab.data.templates import (
    assistant_spans,
    build_chat_prompt,
    build_classification_prompt,
    label_completion,
    merge_system,
    template_for,
)
from peftlab.data.text import load_documents
from peftlab.errors import DataError
from peftlab.evaluation.classification import classification_metrics, head_predictions, label_loglikelihoods
from peftlab.evaluation.compare import forgetting, write_samples
from peftlab.evaluation.generation import answer_loss, generate_greedy
from peftlab.evaluation.perplexity import LMScores, score_tokens
from peftlab.evaluation.suite import EvalData, evaluate_lm
from peftlab.heads import NO_LM_HEAD, is_sequence_classifier
from peftlab.models import cache_dir
from peftlab.runs import atomic_write_json, now_iso

CACHE_VERSION = 1  # bump when a metric's definition changes, so old cached base results are not reused


@dataclass
class ChatItem:
    prompt_ids: list[int]  # the conversation before the reference reply, with the generation prompt
    answer_ids: list[int]  # the reference reply and its end-of-turn token (what training scores)
    reference: str  # the reference reply's text, for BLEU and ROUGE


@dataclass
class EvalInputs:
    """Everything a model is scored on, fixed once so base and tuned see the same tokens."""

    kind: str
    lm: EvalData | None = None
    class_prompts: list[str] = field(default_factory=list)
    class_gold: list[str] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)
    chat: list[ChatItem] = field(default_factory=list)
    general: EvalData | None = None
    general_skipped: str | None = None  # why forgetting is not measured
    sample_prompts: list[str] = field(default_factory=list)
    sample_ids: list[list[int]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """sha256 of every input a score depends on (tokens, prompts, references, labels)."""
        content = {
            "kind": self.kind,
            "lm": [self.lm.ids, self.lm.source, self.lm.documents] if self.lm else None,
            "classification": [self.class_prompts, self.class_gold, self.label_names],
            "chat": [asdict(item) for item in self.chat],
            "general": [self.general.ids, self.general.source] if self.general else None,
            "general_skipped": self.general_skipped,
            "samples": [self.sample_prompts, self.sample_ids],
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


# --- inputs ----------------------------------------------------------------------------------


def first_tokens(tokenizer: Any, text: str, n: int, margin: int = 64) -> list[int]:
    """The first n tokens of `text` without tokenising all of it: tokenise a prefix that yields at
    least n + margin tokens (doubling it as needed), so the cut at the prefix's end, which can change
    its last few tokens, lies well past the n tokens kept."""
    chars = 8 * (n + margin)
    while True:
        ids: list[int] = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if chars >= len(text) or len(ids) >= n + margin:
            return ids[:n]
        chars *= 2


def general_text(cfg: EvalConfig, tokenizer: Any) -> tuple[EvalData | None, str | None]:
    """The forgetting text (first forgetting_max_tokens tokens), or None and the reason it is skipped."""
    if cfg.forgetting_path is None:
        return None, "eval.forgetting_path is null"
    path = Path(DEFAULT_FORGETTING_TEXT if cfg.forgetting_path == "auto" else cfg.forgetting_path)
    if not path.is_file():
        if cfg.forgetting_path == "auto":
            return None, (
                f"default general text {path} not found (relative to {Path.cwd()}); "
                "set eval.forgetting_path to a text file"
            )
        raise DataError(f"eval.forgetting_path: file not found: {path}")
    ids = first_tokens(tokenizer, "".join(load_documents(path, "file")), cfg.forgetting_max_tokens)
    if len(ids) < 2:
        raise DataError(f"eval.forgetting_path: {path} gives fewer than 2 tokens")
    return EvalData(ids, str(path)), None


def sample_prompt_ids(prompts: list[str], tokenizer: Any, cfg: RunConfig) -> list[list[int]]:
    """Each prompt as one user turn with the chat template's generation prompt (the model's own
    template, or data.chat_template for chat data); plain text for a tokenizer without a template."""
    use_template = cfg.data.kind == "chat" or getattr(tokenizer, "chat_template", None)
    texts = [
        build_chat_prompt([{"role": "user", "content": p}], tokenizer, cfg.data.chat_template)
        if use_template
        else p
        for p in prompts
    ]
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def chat_item(messages: list[dict[str, str]], tokenizer: Any, template_choice: str) -> ChatItem | None:
    """Prompt = everything before the last assistant reply, rendered exactly as training renders
    it; None when the record has no assistant reply."""
    template = template_for(tokenizer, template_choice)
    messages = merge_system(messages, tokenizer, template)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return None
    full, spans = assistant_spans(messages[: last + 1], tokenizer, template)
    start, end = spans[-1]
    prompt = tokenizer(full[:start], add_special_tokens=False)["input_ids"]
    answer = tokenizer(full[start:end], add_special_tokens=False)["input_ids"]
    return ChatItem(list(prompt), list(answer), messages[last]["content"])


def build_eval_inputs(cfg: RunConfig, tokenizer: Any, task: TaskData) -> EvalInputs:
    """Fix the evaluation inputs for cfg.data.kind; bad settings fail here, before any model runs."""
    kind, limit = cfg.data.kind, cfg.eval.max_examples
    inputs = EvalInputs(kind=kind)
    if kind == "text" or cfg.data.eval_path:
        ids, text = build_eval_tokens(cfg.data, tokenizer)
        inputs.lm = EvalData(ids, str(cfg.data.eval_path), documents=[text])
    records = task.test_records
    if kind in ("classification", "chat") and not records:
        raise DataError(
            f"{cfg.data.train_path}: no held-out records to evaluate; set data.test_path or "
            "data.test_fraction > 0, or eval.enabled=false"
        )
    if kind == "classification":
        inputs.label_names = list(task.label_names or [])
        chosen = records[:limit]
        outside = sorted({r["label"] for r in chosen} - set(inputs.label_names))
        if outside:
            raise DataError(f"held-out labels {outside} are not in the label set {inputs.label_names}")
        inputs.class_prompts = [
            build_classification_prompt(r["text"], cfg.data.prompt_template) for r in chosen
        ]
        inputs.class_gold = [r["label"] for r in chosen]
    elif kind == "chat":
        counts = inputs.counts
        counts.update(prompts_cut_left=0, skipped_no_reply=0, skipped_answer_too_long=0)  # 0s stated too
        for rec in records:
            item = chat_item(rec["messages"], tokenizer, cfg.data.chat_template)
            # prompt + the longer of reference and generated answer must fit data.max_seq_len;
            # a long conversation keeps its latest turns (the prompt is cut on the left)
            room = cfg.data.max_seq_len - max(len(item.answer_ids) if item else 0, cfg.eval.max_new_tokens)
            if item is None:
                counts["skipped_no_reply"] += 1
            elif room < 1:
                counts["skipped_answer_too_long"] += 1
            else:
                if len(item.prompt_ids) > room:
                    item.prompt_ids = item.prompt_ids[-room:]
                    counts["prompts_cut_left"] += 1
                inputs.chat.append(item)
            if limit is not None and len(inputs.chat) == limit:
                break
        if not inputs.chat:
            raise DataError(
                f"no held-out conversation has an assistant reply that fits data.max_seq_len="
                f"{cfg.data.max_seq_len} with eval.max_new_tokens={cfg.eval.max_new_tokens}"
            )
    inputs.general, inputs.general_skipped = general_text(cfg.eval, tokenizer)
    inputs.sample_prompts = list(cfg.eval.sample_prompts)
    inputs.sample_ids = sample_prompt_ids(inputs.sample_prompts, tokenizer, cfg)
    return inputs


# --- scoring ---------------------------------------------------------------------------------


def _decode(tokenizer: Any, ids: list[list[int]]) -> list[str]:
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def evaluate_classification(
    model: Any, tokenizer: Any, cfg: EvalConfig, inputs: EvalInputs
) -> dict[str, Any]:
    labels = inputs.label_names
    if is_sequence_classifier(model):  # one forward per example instead of one per label
        indices = head_predictions(model, tokenizer, inputs.class_prompts, labels, cfg.batch_size)
        scoring = "classification head (argmax of class logits)"
    else:
        scores = label_loglikelihoods(
            model,
            tokenizer,
            inputs.class_prompts,
            [label_completion(label) for label in labels],
            batch_size=cfg.batch_size,
            length_normalise=cfg.length_normalise,
        )  # [N, K]
        indices = scores.argmax(dim=1).tolist()
        scoring = "mean label-token log-likelihood" if cfg.length_normalise else "label log-likelihood (sum)"
    predicted = [labels[i] for i in indices]
    return {
        **classification_metrics(inputs.class_gold, predicted, labels),
        "examples": len(predicted),
        "scoring": scoring,
    }


def evaluate_generation(model: Any, tokenizer: Any, cfg: EvalConfig, inputs: EvalInputs) -> dict[str, Any]:
    # sacrebleu and rouge-score (with nltk) cost ~20 MB RSS: imported only where chat data is scored
    from peftlab.evaluation.text_metrics import bleu4, rouge_l

    prompts = [item.prompt_ids for item in inputs.chat]
    generated = generate_greedy(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size)
    answers, references = _decode(tokenizer, generated), [item.reference for item in inputs.chat]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    reference = answer_loss(model, prompts, [item.answer_ids for item in inputs.chat], pad, cfg.batch_size)
    return {
        "bleu4": bleu4(answers, references),
        "rouge_l": rouge_l(answers, references),
        **reference,
        "examples": len(answers),
        "new_tokens": sum(len(g) for g in generated),
        "max_new_tokens": cfg.max_new_tokens,
        "decoding": "greedy",
        **inputs.counts,
    }


def evaluate_model(
    model: Any, tokenizer: Any, cfg: RunConfig, inputs: EvalInputs, which: str, progress: bool = True
) -> dict[str, Any]:
    """Score one model ("base" or "tuned": only a label for progress bars) on the fixed inputs."""
    out: dict[str, Any] = {"kind": cfg.data.kind}
    if is_sequence_classifier(model):  # class logits only: no text to score or write, said so
        parts = {
            "held_out_text": inputs.lm,
            "general_text": inputs.general,
            "sample_answers": inputs.sample_ids,
        }
        out["skipped"] = {name: NO_LM_HEAD for name, present in parts.items() if present}
        if inputs.general is not None:
            out["general_text"] = {"skipped": NO_LM_HEAD}
        if cfg.data.kind == "classification":
            out["classification"] = evaluate_classification(model, tokenizer, cfg.eval, inputs)
        return out
    if inputs.lm is not None:
        out.update(evaluate_lm(model, tokenizer, inputs.lm, cfg.eval, which, progress))
    if cfg.data.kind == "classification":
        out["classification"] = evaluate_classification(model, tokenizer, cfg.eval, inputs)
    elif cfg.data.kind == "chat":
        out["generation"] = evaluate_generation(model, tokenizer, cfg.eval, inputs)
    if inputs.general is not None:
        scores = score_tokens(
            model,
            inputs.general.ids,
            cfg.eval.window,
            cfg.eval.stride,
            batch_size=cfg.eval.batch_size,
            pad_id=tokenizer.pad_token_id or 0,
            progress=progress,
            desc=f"general text {which}",
        )
        out["general_text"] = {**scores.as_dict(), "source": inputs.general.source}
    if inputs.sample_ids:
        generated = generate_greedy(
            model, tokenizer, inputs.sample_ids, cfg.eval.max_new_tokens, cfg.eval.batch_size
        )
        out["sample_answers"] = _decode(tokenizer, generated)
    return out


# --- base cache ------------------------------------------------------------------------------


def model_identity(
    fingerprint: str, cfg: RunConfig, device: torch.device, dtype: torch.dtype, load_options: dict[str, Any]
) -> dict[str, Any]:
    """What makes two base models score alike: weights, revision, device type, dtype, and the load
    options a method asks for (a 4-bit base scores differently from a full-precision one)."""

    def plain(value: Any) -> Any:
        return value.to_dict() if hasattr(value, "to_dict") else str(value)

    return {
        "name": cfg.model.name,
        "fingerprint": fingerprint,
        "revision": cfg.model.revision,
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "load_options": json.loads(json.dumps(load_options, sort_keys=True, default=plain)),
    }


def base_cache_path(identity: dict[str, Any], cfg: EvalConfig, inputs: EvalInputs) -> Path:
    settings = cfg.model_dump(mode="json", exclude={"cache", "enabled"})
    key = json.dumps(
        {"version": CACHE_VERSION, "model": identity, "eval": settings, "inputs": inputs.fingerprint()},
        sort_keys=True,
    )
    return cache_dir() / "evals" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def evaluate_base(
    model: Any,
    tokenizer: Any,
    cfg: RunConfig,
    inputs: EvalInputs,
    identity: dict[str, Any],
    progress: bool = True,
) -> tuple[dict[str, Any], bool]:
    """The base model's evaluation, from the cache when the same model was scored on the same inputs
    with the same settings; returns (result, cache hit)."""
    path = base_cache_path(identity, cfg.eval, inputs) if cfg.eval.cache else None
    if path is not None and path.is_file():
        try:
            result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))["result"]
            print(f"base evaluation: reusing cached result {path} (same model, eval inputs and settings)")
            return result, True
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            pass  # a damaged cache entry is recomputed and rewritten
    result = evaluate_model(model, tokenizer, cfg, inputs, "base", progress)
    if path is not None:
        atomic_write_json(path, {"created": now_iso(), "model": identity, "result": result})
        print(f"base evaluation cached: {path}")
    return result, False


# --- base versus tuned -----------------------------------------------------------------------


def _lm_scores(d: dict[str, Any]) -> LMScores:
    return LMScores(d["nll_sum"], d["tokens"], d["correct"], d["window"], d["stride"])


def compare_sides(
    base: dict[str, Any], tuned: dict[str, Any], inputs: EvalInputs
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Forgetting (tuned minus base cross-entropy on the general text, or why it was skipped) and
    the side-by-side sample rows; the sample answers are taken out of both results."""
    b, t = base.get("general_text") or {}, tuned.get("general_text") or {}
    if b and t and "skipped" not in b and "skipped" not in t:
        result: dict[str, Any] = {**forgetting(_lm_scores(b), _lm_scores(t)), "source": b["source"]}
    else:  # no general text at all, or a side that cannot score it (a classification head)
        why = inputs.general_skipped or t.get("skipped") or b.get("skipped")
        result = {"skipped": why or "no general-text score on both sides"}
    base_answers, tuned_answers = base.pop("sample_answers", []), tuned.pop("sample_answers", [])
    rows = [
        {"prompt": p, "base": a, "tuned": c}
        for p, a, c in zip(inputs.sample_prompts, base_answers, tuned_answers, strict=False)
    ]
    return result, rows


def record_comparison(
    run_dir: Path, base: dict[str, Any], tuned: dict[str, Any], inputs: EvalInputs
) -> dict[str, Any]:
    """compare_sides, with the sample rows written to samples.md / samples.jsonl in the run folder."""
    result, rows = compare_sides(base, tuned, inputs)
    if rows:
        write_samples(
            run_dir, [r["prompt"] for r in rows], [r["base"] for r in rows], [r["tuned"] for r in rows]
        )
    return result


def plot_confusions(plots_dir: Path, sides: dict[str, dict[str, Any]]) -> None:
    """plots/confusion_<side>.png for every side scored on classification."""
    from peftlab.evaluation.classification import plot_confusion

    for side, result in sides.items():
        cls = result.get("classification")
        if cls:
            plots_dir.mkdir(parents=True, exist_ok=True)
            plot_confusion(cls["confusion_matrix"], cls["labels"], plots_dir / f"confusion_{side}.png")
