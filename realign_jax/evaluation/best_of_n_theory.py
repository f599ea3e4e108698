"""Best-of-n theory (Beirami et al., "Theoretical guarantees on the best-of-n alignment policy").

Best-of-n draws n outcomes from a base policy p and keeps the one with the
highest reward, ties broken uniformly at random. For a finite outcome space
with reward levels r, F(r) = P(R <= r) and F^-(r) = P(R < r):

- the best of n lands on level r with probability F(r)^n - F^-(r)^n, split
  among the outcomes of that level in proportion to p (by exchangeability
  of the n draws under uniform tie-breaking), so pi_n(y) / p(y) is constant
  on a level and KL(pi_n || p) = sum_r q_r log(q_r / P(R = r)) with
  q_r = F(r)^n - F^-(r)^n;
- its win rate against p (ties 1/2) is 1 - 1/2 E_{y~p}[F(y)^n + F^-(y)^n]
  <= n / (n + 1);
- KL(pi_n || p) <= log(n) - (n - 1) / n, the "analytical formula", which is
  only a bound (Example 1: two equiprobable outcomes give log 2 - h(2^-n));
- the estimator KL_hat(eps) from eps = p(y) of a best-of-n sample y.
"""

import math
from typing import Sequence

import numpy as np

from realign_jax.plumbing.errors import UserError
from realign_jax.evaluation import stats


def _check_n(n) -> int:
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise UserError(f"best-of-n needs an integer n >= 1, got {n!r}")
  return int(n)


def kl_bound(n: int) -> float:
  """log(n) - (n - 1) / n: the upper bound on KL(best-of-n || base), in nats."""
  n = _check_n(n)
  return math.log(n) - (n - 1) / n


def win_rate_bound(n: int) -> float:
  """n / (n + 1): the upper bound on best-of-n's win rate against its base policy."""
  n = _check_n(n)
  return n / (n + 1)


def kl_estimator(eps, n: int):
  """KL_hat(eps_n) for eps = p(y) of best-of-n samples y (array or scalar).

  KL_hat = (1-eps)^n (log n + (n-1) log(1-eps) - (n-1)/n)
           + (1 - (1-eps)^n) log((1 - (1-eps)^n) / eps).
  """
  n = _check_n(n)
  e = np.asarray(eps, np.float64)
  if np.any(~np.isfinite(e)) or np.any(e <= 0) or np.any(e > 1):
    raise UserError("the best-of-n KL estimator needs probabilities eps in (0, 1]")
  with np.errstate(divide="ignore", invalid="ignore"):
    log_1me = np.log1p(-e)  # -inf at eps = 1, where the first term vanishes
    a = np.exp(n * log_1me)  # (1 - eps)^n
    one_minus_a = -np.expm1(n * log_1me)
    first = np.where(a > 0, a * (math.log(n) + (n - 1) * np.where(a > 0, log_1me, 0.0)
                                 - (n - 1) / n), 0.0)
    second = one_minus_a * (np.log(one_minus_a) - np.log(e))
  out = first + second
  return float(out) if np.ndim(out) == 0 else out


def kl_estimate_from_samples(eps: Sequence[float], n: int) -> dict:
  """Mean of KL_hat over best-of-n samples, with its standard error."""
  values = np.atleast_1d(kl_estimator(np.asarray(eps, np.float64), n))
  mean, se = stats.mean_and_stderr(values)
  return {"kl_hat": mean, "kl_hat_se": se, "kl_bound": kl_bound(n), "num_samples": int(values.size)}


def _levels(probs, rewards):
  """Validated distribution -> (p [K], level index per outcome [K], level masses [L],
  F [L], F^- [L]) with levels in increasing reward."""
  p = np.asarray(probs, np.float64).reshape(-1)
  r = np.asarray(rewards, np.float64).reshape(-1)
  if p.shape != r.shape:
    raise UserError(f"{p.size} probabilities for {r.size} rewards")
  if p.size == 0:
    raise UserError("the distribution has no outcomes")
  if np.any(~np.isfinite(p)) or np.any(p < 0):
    raise UserError("probabilities must be finite and non-negative")
  if np.any(~np.isfinite(r)):
    raise UserError("rewards must be finite")
  total = p.sum()
  if abs(total - 1.0) > 1e-6:
    raise UserError(f"probabilities sum to {total}, not 1")
  p = p / total
  values, level = np.unique(r, return_inverse=True)
  mass = np.bincount(level, weights=p, minlength=values.size)  # [L] P(R = r)
  cdf = np.minimum(np.cumsum(mass), 1.0)
  cdf[-1] = 1.0
  below = np.concatenate([[0.0], cdf[:-1]])  # F^-(r)
  return p, level, mass, cdf, below


def _level_log_probs(mass, cdf, below, n):
  """log q_r = log(F^n - F^-^n) per level [L] (-inf for empty levels), computed as
  n log F + log(1 - (1 - P_r / F)^n) for accuracy when P_r << F."""
  with np.errstate(divide="ignore", invalid="ignore"):
    log_f = np.log(cdf)
    ratio = np.where(cdf > 0, mass / np.where(cdf > 0, cdf, 1.0), 0.0)  # P_r / F
    log_g_over_f = np.log1p(-np.minimum(ratio, 1.0))  # log(F^- / F), -inf when F^- = 0
    log_q = n * log_f + np.log(-np.expm1(n * log_g_over_f))
  return np.where(mass > 0, log_q, -np.inf)


def best_of_n_distribution(probs, rewards, n: int) -> np.ndarray:
  """pi_n(y) [K]: the exact best-of-n distribution over the K outcomes."""
  n = _check_n(n)
  p, level, mass, cdf, below = _levels(probs, rewards)
  log_q = _level_log_probs(mass, cdf, below, n)
  q = np.exp(log_q)
  share = np.where(mass[level] > 0, p / np.where(mass[level] > 0, mass[level], 1.0), 0.0)
  return q[level] * share


def exact_kl(probs, rewards, n: int) -> float:
  """KL(pi_n || p) in nats for a finite distribution `probs` [K] with `rewards` [K]."""
  n = _check_n(n)
  _, _, mass, cdf, below = _levels(probs, rewards)
  log_q = _level_log_probs(mass, cdf, below, n)
  live = mass > 0
  q = np.exp(log_q[live])
  return float(max(np.sum(q * (log_q[live] - np.log(mass[live]))), 0.0))


def exact_win_rate(probs, rewards, n: int) -> float:
  """P(best-of-n beats a base sample) + 1/2 P(tie) = 1 - 1/2 E_{y~p}[F(y)^n + F^-(y)^n]."""
  n = _check_n(n)
  _, _, mass, cdf, below = _levels(probs, rewards)
  return float(1.0 - 0.5 * np.sum(mass * (cdf ** n + below ** n)))
