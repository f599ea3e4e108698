"""KL(pi || pi_ref) of any sampler from its decode rows, with standard errors.

Two estimates of the sequence-level KL E_{y~pi}[log pi(y|x) - log pi_ref(y|x)]:

- exact: each row's `kl` is the sum over generated steps of the
  full-vocabulary KL(pi_t || pi_ref,t) given the sampled prefix; its mean over
  samples is unbiased for the sequence KL (chain rule) and has lower variance
  than the log-ratio, because the expectation over each step's token is done
  exactly;
- log ratio: each row's `log_ratio` = sum_t log pi(y_t) - log pi_ref(y_t), the
  plain Monte Carlo estimate (any sampler that reports per-token log-probs).
"""

from typing import Optional, Sequence

import numpy as np

from realign_jax.evaluation import stats


def kl_estimates(kl: Optional[Sequence[float]], log_ratio: Sequence[float],
                 groups: Optional[Sequence] = None) -> dict:
  """Both KL estimates with standard errors.

  Args:
    kl: [N] per-sample exact sequence KL (sum of per-step full-vocabulary KL),
      or None for samplers that cannot report it.
    log_ratio: [N] per-sample sequence log-ratio log pi(y|x) - log pi_ref(y|x).
    groups: optional [N] prompt labels for per-prompt (clustered) standard errors.

  Returns:
    {"kl_exact", "kl_exact_se", "kl_log_ratio", "kl_log_ratio_se", "num_samples"};
    the exact entries are None when `kl` is None.
  """
  lr_mean, lr_se = stats.mean_and_stderr(log_ratio, groups)
  out = {"kl_exact": None, "kl_exact_se": None, "kl_log_ratio": lr_mean,
         "kl_log_ratio_se": lr_se, "num_samples": int(np.size(log_ratio))}
  if kl is not None:
    if np.size(kl) != np.size(log_ratio):
      raise ValueError(f"{np.size(kl)} exact KL values for {np.size(log_ratio)} log-ratios")
    out["kl_exact"], out["kl_exact_se"] = stats.mean_and_stderr(kl, groups)
  return out


def kl_from_rows(rows: Sequence[dict]) -> dict:
  """`kl_estimates` over decode rows (their `kl` and `log_ratio` fields).

  Standard errors are per prompt when rows carry `prompt_index` and every prompt
  holds the same number of samples, else per row.
  """
  kl = [r["kl"] for r in rows] if all("kl" in r for r in rows) else None
  log_ratio = [r["log_ratio"] for r in rows]
  groups = None
  if all("prompt_index" in r for r in rows):
    counts = np.unique([r["prompt_index"] for r in rows], return_counts=True)[1]
    if counts.max() > 1 and counts.min() == counts.max():
      groups = [r["prompt_index"] for r in rows]
  return kl_estimates(kl, log_ratio, groups)
