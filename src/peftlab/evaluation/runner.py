"""Which evaluation for which data kind: the one entry point for training and `peftlab eval`.

`evaluate_model` scores one model on the fixed inputs, base and tuned alike:

- held-out text (data.eval_path; required for kind text): token perplexity, token accuracy, word and
  byte perplexity, bits per byte (held_out_text.evaluate_lm), at the top level of the result;
- kind classification: each label's completion log-likelihood (a model with a classification head:
  the argmax of its class logits) -> accuracy, macro-F1, per-class precision/recall, confusion
  matrix, under "classification";
- kind chat: greedy answers from the chat template's generation prompt (batched, left padding) ->
  BLEU-4, ROUGE-L, plus the loss and perplexity of the reference answers, under "generation";
- every kind: cross-entropy on a general text under "general_text" (forgetting = tuned - base) and
  the greedy answers to eval.sample_prompts under "sample_answers".

The inputs come from evaluation/inputs.py, the base result's cache is evaluation/base_cache.py.
Nothing here looks at the fine-tuning method (a head model is recognised by the model itself:
model.structure.is_sequence_classifier).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftlab.config.run import RunConfig
from peftlab.config.sections import EvalConfig
from peftlab.data.templates import (
    label_completion,
)
from peftlab.evaluation.base_vs_tuned import forgetting, write_samples
from peftlab.evaluation.classification import classification_metrics, head_predictions, label_loglikelihoods
from peftlab.evaluation.generation import answer_loss, generate_greedy
from peftlab.evaluation.held_out_text import evaluate_lm
from peftlab.evaluation.inputs import EvalInputs
from peftlab.evaluation.perplexity import LMScores, score_tokens
from peftlab.model.structure import NO_LM_HEAD, is_sequence_classifier


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
