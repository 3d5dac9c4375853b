"""Benchmark classification scoring on SmolLM2-135M: every prompt once for all labels (packed rows,
evaluation.classification.label_loglikelihoods) against one forward per (example, label) pair
(label_loglikelihoods_reference), both in ONE run on the same sentences.

Two tasks on the first --limit sentences of SST-2 dev (default: all 872), with the prompt template
of configs/sst2-classification.yaml:
- sst2: its two labels, " negative" / " positive" (one token each);
- four-label: a synthetic task with multi-token labels on the same sentences, " very negative",
  " negative", " positive", " very positive" (no gold: only speed and agreement are measured).

Figures: examples per second of each path, their ratio, whether the argmax predictions are
identical, the largest |score difference|, and SST-2 accuracy. The two paths run in turn for
--repeats rounds, the order flipped each round, and the best time of each is kept (the machine may
be shared). Prints a table and writes bench/results/classification.json.

    PYTHONPATH=src .venv/bin/python bench/classification.py                 # all 872 sentences
    PYTHONPATH=src .venv/bin/python bench/classification.py --limit 64
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from peftlab.config.loading import load_config
from peftlab.config.sections import ModelConfig
from peftlab.data.formats import normalise
from peftlab.data.loading import load_raw
from peftlab.data.templates import build_classification_prompt, label_completion
from peftlab.evaluation.classification import (
    label_loglikelihoods,
    label_loglikelihoods_reference,
    packs_labels,
)
from peftlab.model.loading import load_model, load_tokenizer, resolve_source

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "sst2-classification.yaml"
FOUR_LABELS = ["very negative", "negative", "positive", "very positive"]


def sst2_dev(limit: int | None) -> tuple[list[str], list[str], list[str]]:
    """(prompts, gold labels, label names) of the first `limit` SST-2 dev sentences, read and
    prompted as configs/sst2-classification.yaml says."""
    data = load_config(CONFIG).data
    assert data.test_path is not None
    path = Path(data.test_path)
    path = path if path.is_absolute() else ROOT / path
    records = normalise(
        load_raw(str(path), data.file_format, data.header, data.columns),
        "classification",
        data.fields,
        data.label_names,
        data.on_error,
        Counter(),
    )[:limit]
    assert data.label_names is not None
    prompts = [build_classification_prompt(r["text"], data.prompt_template) for r in records]
    return prompts, [r["label"] for r in records], list(data.label_names)


def timed(fn: Any) -> tuple[float, torch.Tensor]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def compare(
    model: torch.nn.Module, tokenizer: Any, prompts: list[str], labels: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    completions = [label_completion(label) for label in labels]
    sides = {
        "packed": lambda: label_loglikelihoods(model, tokenizer, prompts, completions, args.batch_size),
        "reference": lambda: label_loglikelihoods_reference(
            model, tokenizer, prompts, completions, args.batch_size
        ),
    }
    seconds: dict[str, list[float]] = {"packed": [], "reference": []}
    scores: dict[str, torch.Tensor] = {}
    for r in range(args.repeats):
        for side in ("packed", "reference") if r % 2 == 0 else ("reference", "packed"):
            took, scores[side] = timed(sides[side])
            seconds[side].append(took)
            print(f"  {side}: {took:.1f} s", flush=True)
    best = {side: min(v) for side, v in seconds.items()}
    packed, reference = scores["packed"], scores["reference"]
    return {
        "labels": labels,
        "label_tokens": [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions],
        "examples": len(prompts),
        "packed_seconds": best["packed"],
        "reference_seconds": best["reference"],
        "packed_examples_per_s": len(prompts) / best["packed"],
        "reference_examples_per_s": len(prompts) / best["reference"],
        "speed_ratio": best["reference"] / best["packed"],
        "goal_ratio": len(labels) / 2,
        "predictions_identical": packed.argmax(1).tolist() == reference.argmax(1).tolist(),
        "max_abs_score_difference": float((packed - reference).abs().max()),
        "predicted": packed.argmax(1).tolist(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None, help="the first N SST-2 dev sentences (default all)")
    ap.add_argument(
        "--batch-size", type=int, default=8, help="examples (packed) or pairs (reference) per forward"
    )
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    mcfg = ModelConfig(device="cpu", dtype="float32")
    source = resolve_source(mcfg)
    tokenizer = load_tokenizer(source, mcfg)
    model = load_model(source, mcfg, torch.device("cpu"), torch.float32).eval()
    assert packs_labels(model)
    prompts, gold, sst2_labels = sst2_dev(args.limit)
    label_loglikelihoods(model, tokenizer, prompts[:4], [" a", " b c"], 4)  # warm-up: kernels, allocations

    tasks: dict[str, dict[str, Any]] = {}
    for name, labels in (("sst2", sst2_labels), ("four-label", FOUR_LABELS)):
        print(f"{name}: {len(prompts)} examples, labels {labels}", flush=True)
        tasks[name] = compare(model, tokenizer, prompts, labels, args)
    predicted = [sst2_labels[i] for i in tasks["sst2"].pop("predicted")]
    tasks["sst2"]["accuracy"] = sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold)
    tasks["four-label"].pop("predicted")

    result = {
        "model": source.description,
        "dtype": "float32",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "data": f"SST-2 dev, first {len(prompts)} sentences, prompt of {CONFIG.name}",
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "tasks": tasks,
    }
    print(
        f"\n{'task':<11} {'K':>2} {'packed ex/s':>12} {'reference ex/s':>15} {'ratio':>6} {'goal':>5} "
        f"{'same argmax':>11} {'max |diff|':>10}"
    )
    for name, t in tasks.items():
        print(
            f"{name:<11} {len(t['labels']):>2} {t['packed_examples_per_s']:>12.2f} "
            f"{t['reference_examples_per_s']:>15.2f} {t['speed_ratio']:>6.2f} {t['goal_ratio']:>5.1f} "
            f"{t['predictions_identical']!s:>11} {t['max_abs_score_difference']:>10.2e}"
        )
    print(f"SST-2 accuracy (label log-likelihood, base model): {tasks['sst2']['accuracy']:.3f}")
    out = ROOT / "bench" / "results" / "classification.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
