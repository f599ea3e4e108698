"""ROUGE through rouge-score: values derived by hand from the package's documented rules.

rouge-score lower-cases, keeps only [a-z0-9] tokens, Porter-stems tokens longer
than three characters when `use_stemmer`, and computes ROUGE-Lsum as the union
LCS over sentences split on newlines. Each expected value below follows from
those rules on paper (the counts are in the comments).
"""

import math

import pytest

from realign_jax.evaluation import text_metrics


def f(p, r):
  return 2 * p * r / (p + r)


def test_stemming():
  cand, ref = "The cats were running!", "the cat runs"
  # Stemmed: [the, cat, were, run] vs [the, cat, run]: 3 of 4 unigrams match.
  assert text_metrics.rouge_n(cand, ref, 1) == pytest.approx(f(3 / 4, 3 / 3))
  # Bigrams (the cat) (cat were) (were run) vs (the cat) (cat run): one match.
  assert text_metrics.rouge_n(cand, ref, 2) == pytest.approx(f(1 / 3, 1 / 2))
  # LCS "the cat run".
  assert text_metrics.rouge_l(cand, ref) == pytest.approx(f(3 / 4, 3 / 3))
  # Without stemming only "the" would match: F = 2/7, not 6/7.
  assert not math.isclose(text_metrics.rouge_n(cand, ref, 1), 2 / 7)


def test_rouge_lsum_splits_sentences_on_newlines():
  ref = "the cat sat\nthe dog ran"
  cand = "the dog ran\nthe cat sat"
  # ROUGE-L over the whole sequences: the LCS is one sentence, 3 of 6 tokens.
  assert text_metrics.rouge_l(cand, ref) == pytest.approx(0.5)
  # ROUGE-Lsum: each reference sentence is covered by some candidate sentence.
  assert text_metrics.rouge_lsum(cand, ref) == pytest.approx(1.0)
  # One line: Lsum is ROUGE-L.
  flat = cand.replace("\n", " ")
  assert text_metrics.rouge_lsum(flat, ref.replace("\n", " ")) == pytest.approx(0.5)
  # ROUGE-2 ignores the line breaks: the candidate's bigrams (the dog)(dog ran)(ran the)
  # (the cat)(cat sat), the reference's (the cat)(cat sat)(sat the)(the dog)(dog ran): 4 of 5.
  assert text_metrics.rouge_n(cand, ref, 2) == pytest.approx(0.8)


def test_rouge_scores_means_and_edge_cases():
  out = text_metrics.rouge_scores(["The cats were running!", ""], ["the cat runs", "a b"])
  assert set(out) == {f"{k}{s}" for k in text_metrics.ROUGE_TYPES for s in ("", "_se")}
  assert out["rouge1"] == pytest.approx((6 / 7 + 0.0) / 2)
  assert out["rougeLsum"] == pytest.approx((6 / 7 + 0.0) / 2)
  # Punctuation-only and non-ASCII words are no tokens for rouge-score.
  assert text_metrics.rouge_n("!!!", "the cat", 1) == 0.0
  with pytest.raises(ValueError, match="2 candidates for 1 references"):
    text_metrics.rouge_scores(["a", "b"], ["a"])
  with pytest.raises(ValueError, match="n = 1 or 2"):
    text_metrics.rouge_n("a", "a", 3)
