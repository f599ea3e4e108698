"""The length-reward study's numbers, from its decode rows: every field of results.json.

Per lambda, for DeRa and for PPO retrained at beta / lambda: mean reward, KL,
log-ratio and length with standard errors (clustered by prompt); the exact
KL-regularised optimum at beta / lambda (the reward takes two values, so it
is known in closed form from the SFT success rate p0) and each model's J
against it; the PPO runs' training curves; Pearson's r of the two curves,
where they disagree, and the verdicts on the base beta.
"""

import math

import numpy as np

from realign_jax.decoding.lambda_grid import LambdaGrid
from realign_jax.plumbing.errors import UserError
from realign_jax.evaluation import optimum as opt
from realign_jax.experiments import report as rep
from realign_jax.experiments.length_reward.config import beta_name
from realign_jax.experiments.samples import identical_fraction, rows_at

# NOTE: a retrained model counts as converged when its J is within this of J*
# (or within Z standard errors of its J, whichever is larger).
CONVERGED_TOL = 0.05


def objective_rows(rows, kl_weight: float) -> tuple:
  """(mean, standard error over prompts) of J = r - kl_weight * KL per response.

  kl_weight = inf stands for lambda = 0, the SFT model itself: J = E_ref[r].
  """
  vals = [r["reward"] if math.isinf(kl_weight) else r["reward"] - kl_weight * r["kl"]
          for r in rows]
  return rep.mean_se(vals, [r["prompt_index"] for r in rows])


def optimum_kl_for_reward(p0: float, reward: float) -> float:
  """The least KL to pi_ref of any policy with mean length reward `reward` (in [-1, 0]).

  A reward in {-1, 0} with mean r means success rate q = 1 + r; the cheapest
  way to get it keeps pi_ref inside each outcome and tilts only the outcome's
  odds, so the least KL is the binary KL(q || p0) (0 when q <= p0; +inf when
  q > 0 and p0 = 0). The optimum pi*_beta' lies on this curve.
  """
  q = min(max(1.0 + reward, 0.0), 1.0)
  if q <= p0:
    return 0.0
  if p0 <= 0.0:
    return math.inf
  kl = q * math.log(q / p0)
  if q < 1.0:
    kl += (1.0 - q) * math.log((1.0 - q) / (1.0 - p0))
  return kl


def optimum_columns(lambdas, beta: float, sft_rows, dera_rows, retrained_rows) -> dict:
  """The exact KL-regularised optimum at beta / lambda next to DeRa and the retrained models.

  The length reward takes two values, {-1, 0}: pi*_{beta'} is known in closed
  form from the SFT success rate p0 (`evaluation.optimum.binary_optimum`).
  """
  rewards = sorted({float(r["reward"]) for r in sft_rows})
  if not set(rewards) <= {-1.0, 0.0}:
    raise UserError(f"the SFT samples hold rewards {rewards[:5]}; the length reward gives only "
                    f"-1 and 0")
  p0 = float(np.mean([r["reward"] == 0.0 for r in sft_rows]))
  weights = [math.inf if lam == 0 else beta / lam for lam in lambdas]
  o = opt.binary_optimum(p0, np.array(weights), r_lo=-1.0, r_hi=0.0)
  out = {"p0": p0, "base_beta": beta, "kl_weight": [None if math.isinf(w) else w
                                                     for w in weights],
         "optimum_J": [float(x) for x in o["J"]],
         "optimum_reward": [float(x) for x in o["reward"]],
         "optimum_kl": [float(x) for x in o["kl"]]}
  for prefix, get in (("dera", lambda lam: rows_at(dera_rows, lam)),
                      ("retrained", lambda lam: retrained_rows[lam])):
    js = [objective_rows(get(lam), w) for lam, w in zip(lambdas, weights)]
    out[f"{prefix}_J"] = [j for j, _ in js]
    out[f"{prefix}_J_se"] = [se for _, se in js]
    out[f"{prefix}_J_gap"] = [js_ - j for js_, (j, _) in zip(out["optimum_J"], js)]
    # NOTE: J* - J(pi) = beta' KL(pi || pi*) for any pi (log pi*/pi_ref = r/beta' - log Z):
    # the gap in nats is the model's KL to the optimum itself (estimated as J is).
    out[f"{prefix}_kl_to_optimum"] = [None if math.isinf(w) else g / w for g, w in
                                      zip(out[f"{prefix}_J_gap"], weights)]
  tol = [max(CONVERGED_TOL, rep.Z * se) if math.isfinite(se) else CONVERGED_TOL
         for se in out["retrained_J_se"]]
  # NOTE: where a model's J falls short: the KL it spends beyond the least KL of
  # its own mean reward (spent on changes the reward does not ask for).
  for prefix, get in (("dera", lambda lam: rows_at(dera_rows, lam)),
                      ("retrained", lambda lam: retrained_rows[lam])):
    least = [optimum_kl_for_reward(p0, float(np.mean([r["reward"] for r in get(lam)])))
             for lam in lambdas]
    out[f"{prefix}_least_kl_for_reward"] = least
    out[f"{prefix}_excess_kl"] = [float(np.mean([r["kl"] for r in get(lam)])) - k
                                  for lam, k in zip(lambdas, least)]
  out["retrained_converged_tolerance"] = tol
  out["retrained_converged"] = [bool(g <= t) for g, t in zip(out["retrained_J_gap"], tol)]
  return out


def training_columns(lambdas, training: dict) -> dict:
  """Per lambda: PPO steps taken, whether the stopping rule ended the run, the curve of J.

  None at lambda = 0 (no training) and where a stage left no result.
  """
  steps, stopped, curves = [], [], []
  for lam in lambdas:
    t = training.get(lam)
    if lam == 0 or not t:
      steps.append(None), stopped.append(None), curves.append(None)
      continue
    ev = [e for e in t.get("evals", []) if "regularised" in e]
    steps.append(int(t["step"]))
    stopped.append(bool(t.get("converged", False)))
    curves.append({"step": [int(e["step"]) for e in ev],
                   "J": [float(e["regularised"]) for e in ev],
                   "J_se": [e.get("regularised_se") for e in ev],
                   "reward": [float(e["reward"]) for e in ev],
                   "kl": [float(e["kl"]) for e in ev]})
  return {"retrained_steps": steps, "retrained_stopped_by_rule": stopped,
          "retrained_curves": curves}


def build_results(*, lambdas, beta, window, dera_rows, retrained_rows, sft_in_range,
                  max_sft_in_range, stage_seconds, invocation_seconds, ran, max_new_tokens,
                  settings, stage_cpu_seconds=None, sft_rows=None, training=None) -> dict:
  """Every number of results.json and report.md, from the decode rows.

  `sft_rows` (the SFT model's samples) default to the retrained rows at lambda = 0.
  `training` (optional): lambda -> the PPO stage's result (`stages.train_stage`:
  steps, converged, evals), for the training curves.
  """
  lambdas = LambdaGrid.of(lambdas, minimum=0.0).list()
  if sft_rows is None:
    if 0.0 not in retrained_rows:
      raise UserError("the optimum needs the SFT model's samples: pass sft_rows or a lambda "
                      "grid holding 0")
    sft_rows = retrained_rows[0.0]
  dera = [rep.summarize_rows(rows_at(dera_rows, lam)) for lam in lambdas]
  retr = [rep.summarize_rows(retrained_rows[lam]) for lam in lambdas]
  col = lambda ss, f: [s[f] for s in ss]
  out = {
      "lambdas": lambdas, "beta": beta,
      "retrained_beta": [None if lam == 0 else beta / lam for lam in lambdas],
      "window": list(window), "sft_in_range_fraction": sft_in_range,
      "max_sft_in_range": max_sft_in_range, "max_new_tokens": max_new_tokens,
  }
  for prefix, ss in (("dera", dera), ("retrained", retr)):
    for f in ("reward", "kl", "log_ratio", "length"):
      key = {"log_ratio": "kl_log_ratio"}.get(f, f)
      out[f"{prefix}_{key}"] = col(ss, f)
      out[f"{prefix}_{key}_se"] = col(ss, f + "_se")
    out[f"{prefix}_in_range"] = [float(np.mean([r["reward"] == 0.0 for r in (
        rows_at(dera_rows, lam) if prefix == "dera" else retrained_rows[lam])])) for lam in lambdas]
  out.update(optimum_columns(lambdas, beta, sft_rows, dera_rows, retrained_rows))
  if training:
    out.update(training_columns(lambdas, training))
  out["pearson"] = rep.pearson(out["dera_reward"], out["retrained_reward"])
  out["pearson_ci"] = rep.pearson_ci(out["dera_reward"], out["retrained_reward"])
  out["pearson_kl"] = rep.pearson(out["dera_kl"], out["retrained_kl"])
  out["reward_disagreement_lambdas"] = rep.disagreements(
      lambdas, out["dera_reward"], out["dera_reward_se"], out["retrained_reward"],
      out["retrained_reward_se"])
  out["dera_verdict"] = rep.regularisation_verdict(lambdas, out["dera_reward"],
                                                   out["dera_reward_se"], out["dera_kl"], "DeRa")
  out["retrained_verdict"] = rep.regularisation_verdict(
      lambdas, out["retrained_reward"], out["retrained_reward_se"], out["retrained_kl"],
      "the model retrained")
  # NOTE: DeRa at lambda = 1 samples exactly the base PPO model with the same row
  # seeds, and at lambda = 0 exactly pi_ref: identical tokens are a check of the pipeline.
  checks = {}
  for lam in (0.0, 1.0):
    if lam in lambdas and (lam == 0.0 or settings.get("retrained_names", {}).get("1") ==
                           beta_name(beta)):
      checks[f"{lam:g}"] = identical_fraction(rows_at(dera_rows, lam), retrained_rows[lam])
  out["identical_samples_fraction"] = checks
  out.update(rep.timing_fields(stage_seconds, stage_cpu_seconds, invocation_seconds, ran))
  out["settings"] = settings
  out["num_rows_per_lambda"] = dera[0]["num_rows"]
  return out
