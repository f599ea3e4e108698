"""Means with standard errors, the one place the evaluation package computes them."""

import math
from typing import Optional, Sequence

import numpy as np

from realign_jax.plumbing.errors import UserError


def mean_and_stderr(values, groups: Optional[Sequence] = None) -> tuple[float, float]:
  """Mean of `values` [N] and its standard error.

  Args:
    values: [N] finite numbers.
    groups: optional [N] cluster labels (e.g. the prompt of each row). Samples
      that share a prompt are correlated through it, so with groups the
      standard error is that of the mean of per-group means (every group
      must then hold the same number of rows, which keeps the mean unchanged).

  Returns:
    (mean, standard error); the standard error is NaN with a single value (or group).
  """
  v = np.asarray(values, np.float64).reshape(-1)
  if v.size == 0:
    raise UserError("cannot average an empty set of values")
  if groups is not None:
    labels = list(groups)
    if len(labels) != v.size:
      raise ValueError(f"{len(labels)} group labels for {v.size} values")
    index = {}
    for g in labels:
      index.setdefault(g, len(index))
    ids = np.array([index[g] for g in labels])
    counts = np.bincount(ids)
    if np.any(counts != counts[0]):
      raise UserError(f"groups hold different numbers of rows ({counts.min()} to "
                      f"{counts.max()}); a per-prompt standard error needs equal counts")
    v = np.bincount(ids, weights=v) / counts
  mean = float(v.mean())
  if v.size < 2:
    return mean, math.nan
  return mean, float(v.std(ddof=1) / math.sqrt(v.size))



def clean_for_json(value):
  """NaN/inf -> None throughout a nested summary (JSON has no NaN)."""
  if isinstance(value, dict):
    return {str(k): clean_for_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [clean_for_json(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value
