import pytest
import sacrebleu
from rouge_score import rouge_scorer

from peftlab.evaluation.text_metrics import bleu4, rouge_l

PRED = ["The cats are sitting on the mat.", "He runs quickly to the store", "completely different"]
REFS = ["The cat sat on the mat.", "He ran quickly to the shop", "nothing alike at all here"]


def test_bleu_equals_sacrebleu_called_directly():
    assert bleu4(PRED, REFS) == pytest.approx(sacrebleu.corpus_bleu(PRED, [REFS]).score)
    assert bleu4(REFS, REFS) == pytest.approx(100.0)
    assert 0 < bleu4(PRED, REFS) < 100


def test_rouge_l_equals_rouge_score_with_stemming():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    want = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(PRED, REFS, strict=True)) / 3
    assert rouge_l(PRED, REFS) == pytest.approx(want)
    # stemming on: "cats"/"cat" match, so it beats the unstemmed score
    plain = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    assert rouge_l(PRED[:1], REFS[:1]) > plain.score(REFS[0], PRED[0])["rougeL"].fmeasure
