"""BLEU-4 and ROUGE-L for generated answers, computed by the libraries everyone cites."""

from __future__ import annotations

import sacrebleu
from rouge_score import rouge_scorer


def bleu4(predictions: list[str], references: list[str]) -> float:
    """sacrebleu corpus BLEU (4-gram, default 13a tokenisation) on detokenised text, one reference each."""
    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, Porter stemming on) over the pairs."""
    if not predictions:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)
    ]
    return sum(scores) / len(scores)
