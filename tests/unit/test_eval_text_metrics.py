"""BLEU-4 and ROUGE-L against values worked out by hand on small cases (not against the same library
calls the code makes), so the arguments' order, the tokenisation and the stemming are all pinned."""

import math

import pytest

from peftlab.evaluation.text_metrics import bleu4, rouge_l

SHORT = "the cat sat on the mat"  # 6 tokens
LONG = "the cat sat on the red mat"  # 7 tokens


def test_bleu_of_a_short_prediction_by_hand():
    # prediction SHORT (c = 6), reference LONG (r = 7); clipped n-gram matches / prediction n-grams:
    #   p1 = 6/6 (the x2, cat, sat, on, mat: the reference has "the" twice)
    #   p2 = 4/5 (the cat, cat sat, sat on, on the; not "the mat")
    #   p3 = 3/4 (the cat sat, cat sat on, sat on the; not "on the mat")
    #   p4 = 2/3 (the cat sat on, cat sat on the; not "sat on the mat")
    # c < r: BP = exp(1 - r/c) = exp(1 - 7/6); BLEU = 100 * BP * (p1 p2 p3 p4)^(1/4)
    want = 100 * math.exp(1 - 7 / 6) * (1 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25
    assert want == pytest.approx(67.3182138, rel=1e-8)
    assert bleu4([SHORT], [LONG]) == pytest.approx(want, rel=1e-6)


def test_bleu_with_prediction_and_reference_swapped_differs():
    # prediction LONG (c = 7), reference SHORT (r = 6): c > r, so BP = 1
    #   p1 = 6/7 ("red" unmatched), p2 = 4/6, p3 = 3/5, p4 = 2/4
    want = 100 * (6 / 7 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25
    assert want == pytest.approx(64.3458884, rel=1e-8)
    assert bleu4([LONG], [SHORT]) == pytest.approx(want, rel=1e-6)
    assert abs(bleu4([LONG], [SHORT]) - bleu4([SHORT], [LONG])) > 2  # the brevity penalty is one-sided


def test_bleu_tokenises_punctuation_apart_13a():
    # 13a splits the final "." off: prediction "the cat sat on the mat ." (c = 7), reference
    # "the cat sat on the red mat ." (r = 8):
    #   p1 = 7/7, p2 = 5/6 (+ "mat ."), p3 = 3/5, p4 = 2/4; BP = exp(1 - 8/7)
    # (whitespace tokens "mat." would give the 67.32 of the case without punctuation instead)
    want = 100 * math.exp(1 - 8 / 7) * (1 * 5 / 6 * 3 / 5 * 2 / 4) ** 0.25
    assert want == pytest.approx(61.2975241, rel=1e-8)
    assert bleu4([SHORT + "."], [LONG + "."]) == pytest.approx(want, rel=1e-6)


def test_corpus_bleu_pools_counts_over_sentences():
    # the two cases above as one corpus: matches and totals add up per order, lengths add up
    #   p1 = (6 + 6)/(6 + 7), p2 = (4 + 4)/(5 + 6), p3 = (3 + 3)/(4 + 5), p4 = (2 + 2)/(3 + 4)
    #   c = 13 = r: BP = 1 (an average of the two sentence scores would be 65.83)
    want = 100 * (12 / 13 * 8 / 11 * 6 / 9 * 4 / 7) ** 0.25
    assert bleu4([SHORT, LONG], [LONG, SHORT]) == pytest.approx(want, rel=1e-6)


def test_bleu_of_identical_and_of_empty_predictions():
    assert bleu4([LONG], [LONG]) == pytest.approx(100.0)
    assert bleu4([""], [LONG]) == 0.0
    # an empty prediction among others adds no n-grams but its reference's length: the first case's
    # precisions, with c = 0 + 6 and r = 7 + 7: BP = exp(1 - 14/6)
    want = 100 * math.exp(1 - 14 / 6) * (1 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25
    assert bleu4(["", SHORT], [LONG, LONG]) == pytest.approx(want, rel=1e-6)


def test_rouge_l_with_stemming_by_hand():
    # Porter stems: cats -> cat, running -> run, ran -> ran, were -> were.
    # prediction "the cat were run" (4), reference "the cat ran" (3): LCS "the cat" = 2
    # P = 2/4, R = 2/3, F = 2PR / (P + R) = 4/7 (unstemmed the LCS is "the": F = 2/7)
    assert rouge_l(["the cats were running"], ["the cat ran"]) == pytest.approx(4 / 7, rel=1e-9)


def test_rouge_l_is_the_longest_common_subsequence_not_substring():
    # prediction "the big cat quietly sat" (5), reference "the cat sat down" (4): LCS "the cat sat" = 3
    # (the longest common substring is one word): P = 3/5, R = 3/4, F = 2/3
    assert rouge_l(["the big cat quietly sat"], ["the cat sat down"]) == pytest.approx(2 / 3, rel=1e-9)
    # F is symmetric in P and R, so swapping the two gives the same F
    assert rouge_l(["the cat sat down"], ["the big cat quietly sat"]) == pytest.approx(2 / 3, rel=1e-9)


def test_rouge_l_lowercases_drops_punctuation_and_averages_pairs():
    assert rouge_l(["The Cat!"], ["the cat"]) == pytest.approx(1.0)
    assert rouge_l([""], ["the cat"]) == 0.0
    pairs = (["the cats were running", "", "The Cat!"], ["the cat ran", "the cat", "the cat"])
    assert rouge_l(*pairs) == pytest.approx((4 / 7 + 0 + 1) / 3, rel=1e-9)
    assert rouge_l([], []) == 0.0
