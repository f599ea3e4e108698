"""The exact KL-regularised optimum: the limit every reward-vs-KL study is measured against.

For a reference policy pi_ref, a reward r and a KL weight b > 0, the policy
maximising J(pi) = E_pi[r] - b KL(pi || pi_ref) is

  pi*_b(y) = pi_ref(y) exp(r(y) / b) / Z,   Z = E_ref[exp(r / b)],

with E*[r] = E_ref[r e^{r/b}] / Z, KL(pi*_b || pi_ref) = E*[r] / b - log Z and
J* = J(pi*_b) = b log Z. As b -> infinity, pi* -> pi_ref (KL -> 0,
J* -> E_ref[r]); as b -> 0 it keeps only the best outcomes
(E*[r] -> max r, KL -> -log P_ref(r = max r)).

- `binary_optimum`: closed form for a reward with two values r_lo < r_hi and
  success rate p0 = P_ref(r = r_hi) (the length reward: {-1, 0}).
- `estimate_optimum`: the self-normalised estimate from reward samples of
  pi_ref (weights w_i = exp(r_i / b)), with delta-method standard errors
  (clustered by prompt when groups are given) and the effective sample size.
- `optimum_from_rewards`: the closed form when the samples hold at most two
  reward values (the estimate is then exact up to p0), else the estimate.
- `optimum_curve`, `reward_at_kl`: the optimal reward-against-KL curve.

Every formula is written in shifted (logsumexp) form: with d = (r - r_max) / b
<= 0 and L = log E_ref[e^d], log Z = r_max / b + L, J* = r_max + b L and
KL = E*[d] - L, so b -> 0 neither overflows nor cancels.
"""

import math
import os
from typing import Optional, Sequence

import numpy as np

from realign_jax.evaluation import stats
from realign_jax.plumbing import gin_utils
from realign_jax.plumbing.errors import UserError

# NOTE: ESS below this fraction of the samples: the estimate leans on a few
# responses and its standard error is unreliable.
SMALL_ESS_FRACTION = 0.1


def _check_beta(beta) -> np.ndarray:
  b = np.asarray(beta, np.float64)
  if b.size == 0 or np.any(np.isnan(b)) or np.any(b <= 0):
    raise UserError(f"the KL weight beta must be > 0 (inf allowed: the reference itself), "
                    f"got {beta}")
  return b


def binary_optimum(p0: float, beta, r_lo: float = -1.0, r_hi: float = 0.0) -> dict:
  """Closed form of pi*_b for a reward in {r_lo, r_hi}, P_ref(r = r_hi) = p0.

  Args:
    p0: the reference's success rate, in [0, 1].
    beta: one KL weight or an array of them (> 0; inf gives pi_ref).
    r_lo, r_hi: the two reward values, r_lo < r_hi.

  Returns:
    {"beta", "log_Z", "reward" (E*[r]), "kl" (KL(pi* || pi_ref), nats),
     "J" (b log Z), "success" (pi*(r = r_hi))}, each shaped like `beta`
    (floats for a scalar beta).
  """
  if not (0.0 <= p0 <= 1.0):
    raise UserError(f"the success rate p0 must be in [0, 1], got {p0}")
  if not (math.isfinite(r_lo) and math.isfinite(r_hi) and r_lo < r_hi):
    raise UserError(f"the binary reward needs finite r_lo < r_hi, got {r_lo}, {r_hi}")
  b = _check_beta(beta)
  gap = r_hi - r_lo
  with np.errstate(divide="ignore", invalid="ignore"):
    d = gap / b  # >= 0; 0 at b = inf
    log_p0 = math.log(p0) if p0 > 0 else -math.inf
    log_p1 = math.log1p(-p0) if p0 < 1 else -math.inf
    # L = log(p0 + (1 - p0) e^{-d}) = log Z - r_hi / b
    # NOTE: for small d (large b) the log1p form keeps b L accurate (L ~ -(1 - p0) d).
    L = np.where(d < 1.0, np.log1p((1.0 - p0) * np.expm1(-np.minimum(d, 1.0))),
                 np.logaddexp(log_p0, log_p1 - d))
    q_lo = np.exp(log_p1 - d - L)  # pi*(r = r_lo)
    # KL = q_hi log(q_hi / p0) + q_lo log(q_lo / (1 - p0)) = -L - q_lo d
    kl = np.where(q_lo > 0, -L - q_lo * np.where(q_lo > 0, d, 0.0), -L)
    kl = np.maximum(kl, 0.0)  # NOTE: rounding only; KL >= 0 exactly
    reward = r_hi - q_lo * gap
    # J* = r_hi + b L; at b = inf its limit E_ref[r]
    J = np.where(np.isinf(b), r_hi - (1.0 - p0) * gap, r_hi + np.where(np.isinf(b), 0.0, b) * L)
    log_Z = np.where(np.isinf(b), 0.0, r_hi / b + L)
  out = {"beta": b, "log_Z": log_Z, "reward": reward, "kl": kl, "J": J, "success": 1.0 - q_lo}
  if b.ndim == 0:
    out = {k: float(v) for k, v in out.items()}
  return out


def _cluster_se(psi: np.ndarray, groups: Optional[Sequence]) -> float:
  """Standard error of a mean estimator from its influence values psi [n] (centred here)."""
  n = psi.size
  psi = psi - psi.mean()
  if groups is None:
    sums = psi
  else:
    labels = list(groups)
    if len(labels) != n:
      raise UserError(f"{len(labels)} group labels for {n} reward samples")
    index = {}
    ids = np.array([index.setdefault(g, len(index)) for g in labels])
    sums = np.bincount(ids, weights=psi)
  g = sums.size
  if g < 2:
    return math.nan
  return float(math.sqrt(np.sum(sums * sums) * g / (g - 1)) / n)


def estimate_optimum(rewards, beta: float, groups: Optional[Sequence] = None) -> dict:
  """Self-normalised estimate of pi*_b from reward samples r_i [n] of pi_ref.

  w_i = exp(r_i / b): E*[r] ~ sum w r / sum w, log Z ~ log mean w,
  KL ~ E*[r] / b - log Z, J* ~ b log Z. Standard errors by the delta method
  (influence functions of the two means, summed per group when `groups`
  gives each sample's prompt). `ess` = (sum w)^2 / sum w^2; `small_ess` when
  it is below SMALL_ESS_FRACTION of n. beta = inf gives pi_ref.
  """
  r = np.asarray(rewards, np.float64).reshape(-1)
  if r.size == 0 or not np.all(np.isfinite(r)):
    raise UserError(f"the optimum estimate needs finite reward samples, got {r.size} values"
                    + ("" if r.size == 0 else " with non-finite ones"))
  b = float(_check_beta(beta))
  n = r.size
  r_max = float(r.max())
  if math.isinf(b):
    w = np.ones(n)
    d = np.zeros(n)
  else:
    d = (r - r_max) / b  # <= 0
    w = np.exp(d)  # shifted weights, max 1: no overflow
  mw = float(w.mean())
  q = w / (n * mw)  # self-normalised weights, sum 1
  reward = float(np.sum(q * r))
  # NOTE: for small |d| (large b) the log1p form keeps b L accurate.
  L = math.log1p(float(np.mean(np.expm1(d)))) if np.all(d > -1.0) else math.log(mw)
  kl = max(float(np.sum(q * d)) - L, 0.0)
  J = reward if math.isinf(b) else r_max + b * L
  # Influence values (up to the common 1/n): of log mean w: w / mw; of E*[r]:
  # w (r - E*) / mw; of KL = E*/b - log Z: (w / mw)((r - E*) / b - 1).
  u = w / mw
  se_reward = _cluster_se(u * (r - reward), groups)
  if math.isinf(b):
    se_logz, se_kl, se_J = 0.0, 0.0, se_reward
  else:
    se_logz = _cluster_se(u, groups)
    se_kl = _cluster_se(u * ((r - reward) / b - 1.0), groups)
    se_J = b * se_logz
  ess = float(np.sum(w) ** 2 / np.sum(w * w))
  return {"beta": b, "log_Z": (L if math.isinf(b) else r_max / b + L), "reward": reward,
          "kl": kl, "J": J, "reward_se": se_reward, "kl_se": se_kl, "J_se": se_J,
          "log_Z_se": se_logz, "ess": ess, "n": n,
          "small_ess": bool(ess < SMALL_ESS_FRACTION * n)}


def two_levels(rewards) -> Optional[tuple]:
  """(r_lo, r_hi, p0) when the samples hold exactly two reward values, else None."""
  r = np.asarray(rewards, np.float64).reshape(-1)
  vals = np.unique(r)
  if vals.size != 2:
    return None
  return float(vals[0]), float(vals[1]), float(np.mean(r == vals[1]))


def default_betas(rewards, num: int = 81) -> np.ndarray:
  """KL weights spanning the curve: from 1e-3 to 1e3 times the reward's range, log spaced."""
  r = np.asarray(rewards, np.float64)
  span = float(r.max() - r.min()) if r.size else 0.0
  return np.logspace(-3, 3, num) * (span if span > 0 else 1.0)


def optimum_curve(rewards, betas=None, groups: Optional[Sequence] = None) -> dict:
  """The optimal reward-against-KL curve from reference reward samples.

  Exact (closed form, kind "exact") when the samples hold two reward values,
  else the self-normalised estimate (kind "estimate", with `small_ess`, `ess`
  and the standard errors `reward_se`, `kl_se`, `J_se` per point, clustered by
  `groups`). One value: pi_ref is already optimal (a single point at KL 0).
  beta = inf (pi_ref, KL 0) is always one of the points; they are sorted by KL.
  """
  r = np.asarray(rewards, np.float64).reshape(-1)
  if r.size == 0 or not np.all(np.isfinite(r)):
    raise UserError("the optimum curve needs finite reward samples of the reference")
  betas = default_betas(r) if betas is None else np.asarray(betas, np.float64).reshape(-1)
  _check_beta(betas)
  if not np.any(np.isinf(betas)):  # NOTE: the curve starts at pi_ref itself (KL 0)
    betas = np.append(betas, math.inf)
  lv = two_levels(r)
  if np.unique(r).size == 1:
    return {"kind": "exact", "p0": 1.0, "levels": [float(r[0])], "beta": [math.inf],
            "reward": [float(r[0])], "kl": [0.0], "J": [float(r[0])]}
  if lv is not None:
    o = binary_optimum(lv[2], betas, lv[0], lv[1])
    pts = {k: np.asarray(o[k]) for k in ("beta", "reward", "kl", "J")}
    extra = {"kind": "exact", "p0": lv[2], "levels": [lv[0], lv[1]]}
  else:
    est = [estimate_optimum(r, b, groups) for b in betas]
    pts = {k: np.array([e[k] for e in est]) for k in ("beta", "reward", "kl", "J")}
    extra = {"kind": "estimate", "n": int(r.size)}
    per_point = {k: [e[k] for e in est] for k in ("small_ess", "ess", "reward_se", "kl_se",
                                                   "J_se")}
  order = np.argsort(pts["kl"], kind="stable")
  out = dict(extra)
  for k, v in pts.items():
    out[k] = [float(x) for x in v[order]]
  if lv is None:
    for k, v in per_point.items():
      out[k] = [v[i] for i in order]
  return out


def reward_at_kl(curve: dict, kl) -> np.ndarray:
  """The optimum's reward at KL budget(s) `kl`, interpolated along `curve`.

  The optimal reward is non-decreasing in the KL: below the curve's first
  point it is that point's reward (pi_ref at KL 0), beyond its last point the
  last point's (max r: no policy does better at any KL).
  """
  k = np.asarray(curve["kl"], np.float64)
  v = np.maximum.accumulate(np.asarray(curve["reward"], np.float64))
  return np.interp(np.asarray(kl, np.float64), k, v)


# ---- command line ---------------------------------------------------------------------
def _parse_betas(text: str) -> list:
  try:
    betas = [float(x) for x in text.split(",") if x.strip()]
  except ValueError:
    betas = []
  if not betas or not all(b > 0 for b in betas):
    raise UserError(f"--betas={text!r} must be a comma-separated list of numbers > 0 (inf "
                    f"allowed), e.g. 0.4,0.2,0.1")
  return betas


def _read_samples(path: str) -> tuple:
  import json
  if not os.path.isfile(path):
    raise UserError(f"--samples={path}: no such file (a samples.jsonl of the SFT model, one "
                    f"JSON row with 'reward' and 'prompt_index' per line)")
  rewards, groups = [], []
  with open(path) as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        rewards.append(float(row["reward"]))
        groups.append(row.get("prompt_index", i))
      except (ValueError, KeyError, TypeError):
        raise UserError(f"--samples={path}: line {i} is not a JSON row with a numeric "
                        f"'reward'") from None
  if not rewards:
    raise UserError(f"--samples={path} holds no rows")
  return rewards, groups


def table(*, betas, p0: Optional[float] = None, r_lo: float = -1.0, r_hi: float = 0.0,
          rewards=None, groups=None) -> dict:
  """The optimum at each beta: closed form from p0, or from reward samples of pi_ref."""
  if (p0 is None) == (rewards is None):
    raise UserError("give either the success rate p0 or reward samples of the reference")
  if rewards is not None:
    lv = two_levels(rewards)
    if lv is None and np.unique(np.asarray(rewards, np.float64)).size > 1:
      rows = [estimate_optimum(rewards, b, groups) for b in betas]
      return {"kind": "estimate", "num_samples": len(rewards), "rows": rows}
    if lv is None:  # one value: pi_ref is optimal
      r0 = float(np.asarray(rewards, np.float64).reshape(-1)[0])
      lv = (r0 - 1.0, r0, 1.0)
    r_lo, r_hi, p0 = lv
  o = binary_optimum(p0, np.array(betas, np.float64), r_lo, r_hi)
  rows = [{k: float(o[k][i]) for k in ("beta", "log_Z", "reward", "kl", "J")}
          for i in range(len(betas))]
  return {"kind": "exact", "p0": p0, "levels": [r_lo, r_hi], "rows": rows}


def main(argv: list) -> int:
  import argparse
  import json

  class _Parser(argparse.ArgumentParser):
    def error(self, message):
      self.exit(2, f"error: {message} (see --help)\n")

  p = _Parser(prog="python -m realign_jax.evaluation.optimum",
              description="The exact KL-regularised optimum pi_ref exp(r / beta) / Z at each "
                          "beta: J* = beta log Z, E*[r] and KL(pi* || pi_ref).")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--p0", type=float, help="success rate P_ref(r = r_hi) of a two-valued reward")
  src.add_argument("--samples", help="samples.jsonl of the reference (rows with 'reward')")
  p.add_argument("--betas", required=True, help="comma-separated KL weights, e.g. 0.4,0.2,0.1")
  p.add_argument("--r_lo", type=float, default=-1.0, help="with --p0: the low reward (-1)")
  p.add_argument("--r_hi", type=float, default=0.0, help="with --p0: the high reward (0)")
  p.add_argument("--out", help="also write the table as JSON to this file")
  a = p.parse_args(argv)
  betas = _parse_betas(a.betas)
  if a.samples:
    rewards, groups = _read_samples(a.samples)
    res = table(betas=betas, rewards=rewards, groups=groups)
    res["samples"] = a.samples
  else:
    res = table(betas=betas, p0=a.p0, r_lo=a.r_lo, r_hi=a.r_hi)
  if a.out and not os.path.isdir(os.path.dirname(a.out) or "."):
    raise UserError(f"--out={a.out}: its directory does not exist")
  head = (f"exact (closed form), p0 = {100 * res['p0']:.2f}%, rewards {res['levels']}"
          if res["kind"] == "exact" else
          f"self-normalised estimate from {res['num_samples']} samples")
  print(f"KL-regularised optimum: {head}")
  print(f"{'beta':>8} {'J*':>9} {'E*[r]':>9} {'KL* (nats)':>11}" +
        ("" if res["kind"] == "exact" else f" {'J* se':>8} {'ESS':>8}"))
  for r in res["rows"]:
    print(f"{r['beta']:>8g} {r['J']:>9.4f} {r['reward']:>9.4f} {r['kl']:>11.4f}" +
          ("" if res["kind"] == "exact" else
           f" {r['J_se']:>8.4f} {r['ess']:>8.1f}" + (" small ESS" if r["small_ess"] else "")))
  if a.out:
    from realign_jax.checkpoints.manager import atomic_write_text  # NOTE: lazy: JAX and orbax
    atomic_write_text(a.out, json.dumps(stats.clean_for_json(res), indent=1) + "\n")
    print(f"wrote {a.out}")
  return 0


if __name__ == "__main__":
  gin_utils.run_main(main)
