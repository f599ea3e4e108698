"""Diversity (distinct-n, rep-n) and ROUGE-1/2/L F-measures, on a simple word tokenizer.

Tokenizer: lower-case, split on anything that is not a letter or a digit
(the rouge-score convention without stemming). All functions take plain
strings and return floats (NaN where a quantity is undefined, e.g. distinct-n
over responses with no n-gram at all).
"""

import collections
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
def _f_measure(overlap: float, cand_total: int, ref_total: int) -> float:
  if overlap <= 0 or cand_total == 0 or ref_total == 0:
    return 0.0
  precision, recall = overlap / cand_total, overlap / ref_total
  return 2 * precision * recall / (precision + recall)


def rouge_n(candidate: str, reference: str, n: int) -> float:
  """ROUGE-n F-measure: clipped n-gram overlap, harmonic mean of precision and recall."""
  c = collections.Counter(ngrams(tokenize(candidate), n))
  r = collections.Counter(ngrams(tokenize(reference), n))
  overlap = sum(min(k, r[g]) for g, k in c.items())
  return _f_measure(overlap, sum(c.values()), sum(r.values()))


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


def rouge_l(candidate: str, reference: str) -> float:
  """ROUGE-L F-measure from the longest common subsequence of the two word lists."""
  c, r = tokenize(candidate), tokenize(reference)
  return _f_measure(lcs_length(c, r), len(c), len(r))


def rouge_scores(candidates: Sequence[str], references: Sequence[str]) -> dict:
  """Mean ROUGE-1/2/L F-measures over aligned (candidate, reference) pairs, with SEs."""
  if len(candidates) != len(references):
    raise ValueError(f"{len(candidates)} candidates for {len(references)} references")
  cols = {"rouge1": [], "rouge2": [], "rougeL": []}
  for c, r in zip(candidates, references):
    cols["rouge1"].append(rouge_n(c, r, 1))
    cols["rouge2"].append(rouge_n(c, r, 2))
    cols["rougeL"].append(rouge_l(c, r))
  out = {}
  for k, v in cols.items():
    out[k], out[f"{k}_se"] = stats.mean_and_stderr(v)
  return out


def diversity(texts: Sequence[str], orders: Sequence[int] = (1, 2, 3)) -> dict:
  """{"distinct_n": ..., "rep_n": ...} for each order n."""
  out = {}
  for n in orders:
    out[f"distinct_{n}"] = distinct_n(texts, n)
    out[f"rep_{n}"] = rep_n(texts, n)
  return out
