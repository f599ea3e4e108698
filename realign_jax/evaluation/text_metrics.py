"""Diversity (distinct-n, rep-n) and ROUGE through the `rouge-score` package.

ROUGE-1/2/L/Lsum F-measures are those of Google's `rouge-score` (the package
behind published XSum and TL;DR ROUGE): its tokenizer (lower-case, only a-z
and 0-9 kept) with the Porter stemmer on, and ROUGE-Lsum as the union LCS over
sentences split on newlines (the package splits on "\n" only; put one
sentence per line to get summary-level ROUGE-L).

Diversity uses a simple word tokenizer: lower-case, split on anything that is
not a letter or a digit. All functions take plain strings and return floats
(NaN where a quantity is undefined, e.g. distinct-n over responses with no
n-gram at all).
"""

import functools
import math
import re
from typing import Sequence

from realign_jax.evaluation import stats

_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def tokenize(text: str) -> list:
  return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list:
  if n < 1:
    raise ValueError(f"n-gram order must be >= 1, got {n}")
  return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


# ---- diversity ----------------------------------------------------------------
def distinct_n(texts: Sequence[str], n: int) -> float:
  """Distinct n-grams over all texts / all n-grams over all texts (corpus level)."""
  total, unique = 0, set()
  for t in texts:
    grams = ngrams(tokenize(t), n)
    total += len(grams)
    unique.update(grams)
  return len(unique) / total if total else math.nan


def rep_n(texts: Sequence[str], n: int) -> float:
  """Mean over texts of 1 - (distinct n-grams / n-grams) within each text.

  A text with fewer than n words repeats nothing and counts as 0, so every
  response is in the average.
  """
  if not texts:
    return math.nan
  reps = []
  for t in texts:
    grams = ngrams(tokenize(t), n)
    reps.append(1.0 - len(set(grams)) / len(grams) if grams else 0.0)
  return sum(reps) / len(reps)


# ---- ROUGE --------------------------------------------------------------------
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@functools.lru_cache(maxsize=None)
def _scorer(rouge_type: str):
  from rouge_score import rouge_scorer
  return rouge_scorer.RougeScorer([rouge_type], use_stemmer=True)


def _rouge(rouge_type: str, candidate: str, reference: str) -> float:
  # NOTE: the package's argument order is (target, prediction).
  return float(_scorer(rouge_type).score(reference, candidate)[rouge_type].fmeasure)


def rouge_n(candidate: str, reference: str, n: int) -> float:
  """ROUGE-n F-measure (n = 1 or 2; stemmed, clipped n-gram overlap)."""
  if n not in (1, 2):
    raise ValueError(f"ROUGE-n is computed for n = 1 or 2, got {n}")
  return _rouge(f"rouge{n}", candidate, reference)


def rouge_l(candidate: str, reference: str) -> float:
  """ROUGE-L F-measure: longest common subsequence of the whole stemmed token lists."""
  return _rouge("rougeL", candidate, reference)


def rouge_lsum(candidate: str, reference: str) -> float:
  """ROUGE-Lsum F-measure: union LCS over newline-separated sentences."""
  return _rouge("rougeLsum", candidate, reference)


def lcs_length(a: Sequence, b: Sequence) -> int:
  """Length of the longest common subsequence (O(len a * len b) time, O(len b) memory)."""
  if not a or not b:
    return 0
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b, 1):
      cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
    prev = cur
  return prev[-1]


def rouge_rows(candidates: Sequence[str], references: Sequence[str]) -> list:
  """ROUGE-1/2/L/Lsum F-measures of each aligned (candidate, reference) pair: [{type: F}]."""
  if len(candidates) != len(references):
    raise ValueError(f"{len(candidates)} candidates for {len(references)} references")
  from rouge_score import rouge_scorer
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
  out = []
  for c, r in zip(candidates, references):
    scores = scorer.score(r, c)
    out.append({k: float(scores[k].fmeasure) for k in ROUGE_TYPES})
  return out


def rouge_means(rows: Sequence[dict]) -> dict:
  """Mean and standard error of each ROUGE type over `rouge_rows`' rows."""
  out = {}
  for k in ROUGE_TYPES:
    out[k], out[f"{k}_se"] = stats.mean_and_stderr([r[k] for r in rows])
  return out


def rouge_scores(candidates: Sequence[str], references: Sequence[str]) -> dict:
  """Mean ROUGE-1/2/L/Lsum F-measures over aligned (candidate, reference) pairs, with SEs."""
  return rouge_means(rouge_rows(candidates, references))


def diversity(texts: Sequence[str], orders: Sequence[int] = (1, 2, 3)) -> dict:
  """{"distinct_n": ..., "rep_n": ...} for each order n."""
  out = {}
  for n in orders:
    out[f"distinct_{n}"] = distinct_n(texts, n)
    out[f"rep_{n}"] = rep_n(texts, n)
  return out
