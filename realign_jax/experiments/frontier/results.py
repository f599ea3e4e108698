"""The frontier study's numbers, from its decode rows: every entry of results.json.

One entry per method and setting (reward, KL of its kind, length, with
standard errors clustered by prompt), best-of-n for every n from one draw,
the Pareto frontier, the best method within each KL budget, and each entry's
gap to the KL-regularised optimum estimated from the SFT model's samples.
"""

import math
from typing import Optional, Sequence

import numpy as np

from realign_jax.plumbing.errors import UserError
from realign_jax.evaluation import best_of_n_theory as bon
from realign_jax.evaluation import optimum as opt
from realign_jax.experiments import report as rep
from realign_jax.rewards import base

# NOTE: the KL budgets of the report's "best method under a budget" table, in nats.
BUDGETS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def response_length(row: dict) -> int:
  """A response's length: its tokens without EOS, as the length reward (eq. 10) counts them.

  NOTE: decode rows' `length` counts every generated token, EOS included
  (= len(tokens)); the entries' `length` (and the length study's) does not.
  Rows without `tokens` are taken to hold the response length already.
  """
  if "tokens" not in row:
    return int(row["length"])
  return len(base.strip_ids(row["tokens"]))


def entry(method: str, setting: Optional[str], rows: Sequence[dict]) -> dict:
  """One method and setting from its decode rows: means and standard errors by prompt."""
  if not rows:
    raise UserError(f"no decode rows for {method} {setting}")
  groups = [r["prompt_index"] for r in rows]
  out = {"method": method, "setting": setting, "num_rows": len(rows)}
  out["reward"], out["reward_se"] = rep.mean_se([r["reward"] for r in rows], groups)
  out["length"], _ = rep.mean_se([response_length(r) for r in rows], groups)
  if all("kl" in r for r in rows):
    out["kl"], out["kl_se"] = rep.mean_se([r["kl"] for r in rows], groups)
    out["kl_kind"], out["kl_bound"] = "exact", None
  else:  # blockwise CD: per-block best-of-K estimator and bound
    out["kl"], out["kl_se"] = rep.mean_se([r["kl_estimate"] for r in rows], groups)
    out["kl_kind"] = "bon_estimator"
    out["kl_bound"] = float(np.mean([r["kl_bound"] for r in rows]))
  return out


def best_of_n_entries(rows: Sequence[dict], ns: Sequence[int]) -> list:
  """Best-of-n for every n from one draw of max(ns) samples per prompt.

  Best-of-n keeps the highest-reward of the prompt's samples 0..n-1 (ties:
  the lowest index, as `decoding.best_of_n`); its KL is the best-of-n
  estimator at eps = p(y) of the kept sample, with the bound and the exact
  best-of-n KL of the prompt's empirical reward levels (all max(ns) samples).
  """
  by_prompt = {}
  for r in rows:
    by_prompt.setdefault(r["prompt_index"], []).append(r)
  n_max = max(ns)
  for p, rs in by_prompt.items():
    rs.sort(key=lambda r: r["sample"])
    if len(rs) != n_max:
      raise UserError(f"best-of-n: prompt {p} has {len(rs)} samples, not {n_max}")
  out = []
  for n in ns:
    rewards, kls, levels, lengths = [], [], [], []
    for rs in by_prompt.values():
      sc = np.array([r["reward"] for r in rs[:n]])
      best = rs[int(np.argmax(sc))]
      rewards.append(best["reward"])
      lengths.append(response_length(best))
      eps = float(np.clip(np.exp(np.sum(best["ref_logprobs"])), np.finfo(float).tiny, 1.0))
      kls.append(bon.kl_estimator(eps, n))
      levels.append(bon.exact_kl(np.full(n_max, 1.0 / n_max), [r["reward"] for r in rs], n))
    m, se = rep.mean_se(rewards)
    k, kse = rep.mean_se(kls)
    out.append({"method": "best_of_n", "setting": f"n={n}", "num_rows": len(rewards),
                "reward": m, "reward_se": se, "length": float(np.mean(lengths)), "kl": k,
                "kl_se": kse, "kl_kind": "bon_estimator", "kl_bound": bon.kl_bound(n),
                "kl_levels": float(np.mean(levels))})
  return out


def entries_of(decoded: Sequence[tuple], best_of_n: Sequence[int],
               lambdas: Sequence[float]) -> tuple:
  """(entries, the SFT model's samples or None) from the decode stages.

  `decoded`: (method, setting, rows, extra) per decode stage, in order; `extra`
  (the stage, its time and decode statistics) is copied into its entries.
  """
  entries, reference_rows = [], None
  for method, setting, rows, extra in decoded:
    if method == "best_of_n":
      reference_rows = rows  # NOTE: samples of p itself: the optimum's reference
      entries += [dict(e, **extra) for e in best_of_n_entries(rows, best_of_n)]
    elif method == "dera":
      for lam in lambdas:
        entries.append(dict(entry(method, f"lambda={lam:g}", [r for r in rows
                                                             if r["lam"] == lam]), **extra))
    else:
      entries.append(dict(entry(method, setting, rows), **extra))
  return entries, reference_rows


def pareto(entries: Sequence[dict]) -> list:
  """Indices of the entries no other entry dominates (reward >= and KL <=, one strictly)."""
  keep = []
  for i, a in enumerate(entries):
    dominated = any(
        b["reward"] >= a["reward"] and b["kl"] <= a["kl"]
        and (b["reward"] > a["reward"] or b["kl"] < a["kl"])
        for j, b in enumerate(entries) if j != i)
    if not dominated:
      keep.append(i)
  return sorted(keep, key=lambda i: entries[i]["kl"])


def budget_table(entries: Sequence[dict], budgets=BUDGETS) -> list:
  """For each KL budget: the entry with the highest mean reward at KL <= budget."""
  out = []
  for b in budgets:
    ok = [e for e in entries if e["kl"] <= b]
    if not ok:
      out.append({"budget": b, "method": None, "setting": None, "reward": None, "kl": None})
      continue
    best = max(ok, key=lambda e: e["reward"])
    out.append({"budget": b, "method": best["method"], "setting": best["setting"],
                "reward": best["reward"], "kl": best["kl"], "kl_kind": best["kl_kind"]})
  return out


def optimum_block(reference_rows: Optional[Sequence[dict]]) -> dict:
  """The KL-regularised optimum from the SFT model's samples (the best_of_n stage's rows).

  Closed form when their rewards take two values (kind "exact", with p0), else
  the self-normalised estimate (kind "estimate", clustered by prompt, with the
  effective sample size per point); kind None without such samples.
  """
  if not reference_rows:
    return {"kind": None, "reason": "no samples of the SFT model (the best_of_n stage did "
                                    "not run)"}
  rewards = [r["reward"] for r in reference_rows]
  curve = opt.optimum_curve(rewards, groups=[r["prompt_index"] for r in reference_rows])
  curve["source"] = "best_of_n"
  curve["num_samples"] = len(rewards)
  curve["reference_reward"] = float(np.mean(rewards))
  return curve


def build_results(entries: list, settings: dict,
                  reference_rows: Optional[Sequence[dict]] = None) -> dict:
  """Frontier, budgets and, with the SFT model's samples, each entry's gap to the optimum.

  gap_to_optimum = the optimum's reward at the entry's KL minus the entry's reward
  (at the KL of its kind: exact, or the best-of-n estimate).
  """
  front = pareto(entries)
  for i, e in enumerate(entries):
    e["pareto"] = i in front
  best = optimum_block(reference_rows)
  for e in entries:
    if best["kind"] is not None and e.get("kl") is not None and math.isfinite(e["kl"]):
      e["optimum_reward_at_kl"] = float(opt.reward_at_kl(best, e["kl"]))
      e["gap_to_optimum"] = e["optimum_reward_at_kl"] - e["reward"]
    else:
      e["optimum_reward_at_kl"] = e["gap_to_optimum"] = None
  return {"entries": entries, "pareto": [[entries[i]["method"], entries[i]["setting"]]
                                         for i in front],
          "budgets": budget_table(entries), "settings": settings, "optimum": best}
