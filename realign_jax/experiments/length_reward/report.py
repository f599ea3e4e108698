"""The length-reward study's report.md and figures, from its results (`results.build_results`)."""

import math
import os

import numpy as np

from realign_jax.evaluation import optimum as opt
from realign_jax.experiments import report as rep
from realign_jax.experiments.length_reward.config import beta_name
from realign_jax.experiments.length_reward.results import CONVERGED_TOL
from realign_jax.experiments.samples import rows_at


def write_figures(model_dir, results, dera_rows, retrained_rows) -> dict:
  lambdas = results["lambdas"]
  beta = results["base_beta"]
  star = "exact KL-regularised optimum at beta / lambda"

  def curves(key, dera="DeRa", retrained="retrained"):
    return {dera: (results[f"dera_{key}"], results[f"dera_{key}_se"]),
            retrained: (results[f"retrained_{key}"], results[f"retrained_{key}_se"])}
  figs = {}
  figs["reward"] = rep.plot_lambda_curves(
      os.path.join(model_dir, "fig2a_reward_vs_lambda.png"), lambdas,
      curves("reward", "DeRa (one aligned model)", "retrained at beta / lambda"),
      ylabel="mean length reward", title="Length reward against lambda (Fig. 2a)",
      base_beta=beta, lines={star: results["optimum_reward"]})
  figs["kl"] = rep.plot_lambda_curves(
      os.path.join(model_dir, "kl_vs_lambda.png"), lambdas, curves("kl"),
      ylabel="KL(pi || pi_ref), nats", title="KL to the SFT model against lambda",
      base_beta=beta, lines={star: results["optimum_kl"]})
  figs["objective"] = rep.plot_lambda_curves(
      os.path.join(model_dir, "objective_vs_lambda.png"), lambdas, curves("J"),
      ylabel="J = E[r] - (beta / lambda) KL",
      title="Regularised objective at beta / lambda (J* = its maximum)",
      base_beta=beta, lines={"J* (" + star + ")": results["optimum_J"]})
  curve = _optimum_curve(results["p0"])
  notes = [f"lambda={lam:g}" for lam in lambdas]
  figs["reward_kl"] = rep.plot_reward_kl(
      os.path.join(model_dir, "reward_vs_kl.png"), curve,
      {"DeRa (lambda)": (results["dera_kl"], results["dera_kl_se"], results["dera_reward"],
                         results["dera_reward_se"], notes),
       "retrained at beta / lambda": (results["retrained_kl"], results["retrained_kl_se"],
                                      results["retrained_reward"],
                                      results["retrained_reward_se"], notes)},
      title=f"Length reward against KL (SFT success rate p0 = {100 * results['p0']:.1f}%)",
      ylabel="mean length reward")
  # NOTE: a run without evaluations (eval_every = 0) has an empty curve: nothing to draw.
  curves = [c if c and c["J"] else None for c in results.get("retrained_curves") or []]
  if any(curves):
    figs["training"] = rep.plot_training_curves(
        os.path.join(model_dir, "ppo_training_curves.png"),
        {f"beta' = {results['kl_weight'][i]:g} (lambda = {lambdas[i]:g})":
         (c["step"], c["J"], c["J_se"], results["optimum_J"][i])
         for i, c in enumerate(curves) if c},
        title="PPO: J = E[r] - beta' KL on held-out prompts (dashed: J*)")
  window = tuple(results["window"])
  t_max = results["max_new_tokens"]
  figs["dera_hist"] = rep.plot_histograms(
      os.path.join(model_dir, "fig2b_dera_lengths.png"),
      {lam: [r["length"] for r in rows_at(dera_rows, lam)] for lam in lambdas}, window=window,
      title="DeRa response lengths (Fig. 2b)", max_length=t_max)
  figs["retrained_hist"] = rep.plot_histograms(
      os.path.join(model_dir, "fig2c_retrained_lengths.png"),
      {lam: [r["length"] for r in retrained_rows[lam]] for lam in lambdas}, window=window,
      title="Retrained response lengths (Fig. 2c)", max_length=t_max)
  figs["length_grid"] = rep.plot_length_grid(
      os.path.join(model_dir, "lengths_by_lambda.png"), lambdas,
      {"DeRa": {lam: [r["length"] for r in rows_at(dera_rows, lam)] for lam in lambdas},
       "retrained at beta / lambda": {lam: [r["length"] for r in retrained_rows[lam]]
                                      for lam in lambdas}},
      window=window, max_length=t_max, title="Share of responses by length")
  return figs


def _optimum_curve(p0: float) -> dict:
  """The optimal reward-against-KL curve of the length reward for SFT success rate p0."""
  o = opt.binary_optimum(p0, np.append(np.logspace(-3, 3, 121), math.inf))
  order = np.argsort(o["kl"], kind="stable")
  return {"kl": o["kl"][order], "reward": o["reward"][order]}


def _gap_words(gap: float, se: float) -> str:
  f = rep.fmt
  if gap >= 0:
    return f"{f(gap)} below J*" + ("" if not math.isfinite(se) else f" (standard error {f(se)})")
  return f"{f(-gap)} above J* (sampling noise: no policy beats J*; standard error {f(se)})"


def _excess_words(res: dict, i: int) -> str:
  f = rep.fmt
  ex = res["retrained_excess_kl"][i]
  return (f" The retrained model spends {f(res['retrained_kl'][i])} nats for mean reward "
          f"{f(res['retrained_reward'][i])}, which needs "
          f"{f(res['retrained_least_kl_for_reward'][i])} "
          f"at least: {f(ex)} nats (costing {f(res['kl_weight'][i] * ex)} of J) go to changes "
          f"the reward does not ask for.")


def optimum_section(res: dict) -> list:
  """The report's comparison of every model with the exact optimum at beta / lambda."""
  f = rep.fmt
  lam = res["lambdas"]
  e_ref = res["p0"] - 1.0  # E_SFT[r] for a reward in {-1, 0}
  lines = ["## Against the exact KL-regularised optimum", "",
           f"With a reward in {{-1, 0}} the optimum of J = E[r] - beta' KL(pi || pi_SFT) is "
           f"pi* ∝ pi_SFT exp(r / beta'), known in closed form from the SFT success rate "
           f"p0 = **{100 * res['p0']:.1f}%** (the share of the SFT samples with reward 0): "
           f"J* = beta' log(p0 + (1 - p0) e^(-1/beta')). Each lambda stands for "
           f"beta' = beta / lambda (base beta = {res['base_beta']:g}; lambda = 0 is the SFT "
           f"model, beta' = inf, where J = E_SFT[r] = {f(e_ref)} is optimal). A retrained "
           f"model counts as converged when its J is within "
           f"max({CONVERGED_TOL:g}, {rep.Z:g} standard errors) of J*.", ""]
  rows = []
  for i, x in enumerate(lam):
    w = res["kl_weight"][i]
    rows.append([f"{x:g}", "inf" if w is None else f"{w:g}", f(res["optimum_J"][i]),
                 f(res["optimum_reward"][i]), f(res["optimum_kl"][i]),
                 f"{f(res['dera_J'][i])} ± {f(res['dera_J_se'][i])}",
                 f"{f(res['retrained_J'][i])} ± {f(res['retrained_J_se'][i])}",
                 "yes" if res["retrained_converged"][i] else "**no**"])
  lines += [rep.markdown_table(
      ["lambda", "beta / lambda", "J*", "E*[r]", "KL* (nats)", "DeRa J", "retrained J",
       "retrained converged"], rows), ""]
  if "retrained_kl_to_optimum" in res:
    lines += ["A model's gap is its KL to the optimum: J* - J = beta' KL(pi || pi*) for any "
              "pi, since log pi*/pi_SFT = r / beta' - log Z. KL(pi || pi*) in nats, retrained / "
              "DeRa: " + "; ".join(
                  f"lambda = {x:g}: {f(res['retrained_kl_to_optimum'][i])} / "
                  f"{f(res['dera_kl_to_optimum'][i])}"
                  for i, x in enumerate(lam) if res["kl_weight"][i] is not None) + ".", ""]
  for i, x in enumerate(lam):
    w = res["kl_weight"][i]
    if w is None:
      lines.append(f"- lambda = 0: both are the SFT model, J = E_SFT[r] = "
                   f"{f(res['retrained_J'][i])}, the optimum's limit as beta' grows.")
      continue
    lines.append(
        f"- lambda = {x:g} (beta' = {w:g}): the retrained model is "
        f"{_gap_words(res['retrained_J_gap'][i], res['retrained_J_se'][i])}, "
        f"{'within' if res['retrained_converged'][i] else 'outside'} the tolerance "
        f"{f(res['retrained_converged_tolerance'][i])}; DeRa is "
        f"{_gap_words(res['dera_J_gap'][i], res['dera_J_se'][i])}."
        + (_excess_words(res, i) if "retrained_excess_kl" in res else ""))
  trained = [i for i, w in enumerate(res["kl_weight"]) if w is not None]
  bad = [lam[i] for i in trained if not res["retrained_converged"][i]]
  if bad:
    lines += ["", f"**{len(bad)} of {len(trained)} retrained models are not at the optimum "
              f"they stand for** (lambda = {', '.join(f'{x:g}' for x in bad)}): at those "
              f"lambdas the comparison with DeRa measures the retraining's optimisation, not "
              f"the trade-off at beta / lambda."]
  elif trained:
    lines += ["", f"All {len(trained)} retrained models are within tolerance of the optimum."]
  return lines


def training_section(res: dict) -> list:
  """The report's PPO training curves: the stopping rule, steps and J per run."""
  curves = [c if c and c["J"] else None for c in res.get("retrained_curves") or []]
  if not any(curves):
    return []
  f = rep.fmt
  conv = res["settings"].get("ppo_convergence") or {}
  lines = ["## PPO training to convergence", ""]
  if conv.get("stop_window"):
    lines.append(
        f"Rule: every {conv['eval_every']} steps J = E[r] - beta' KL is evaluated on "
        f"{conv['eval_prompts']} held-out prompts (the first of the "
        f"`{res['settings']['eval_split']}` "
        f"split, one sample each, a fixed seed; exact KL); a run stops when none of the last "
        f"{conv['stop_window']} evaluations improves on the best earlier one by more than that "
        f"one's standard error, and after {conv['max_steps']} steps at most (then it did not "
        f"converge by the rule).")
  else:
    lines.append(f"No stopping rule: every run trains {res['settings']['ppo_steps']} steps.")
  lines.append("")
  rows = []
  for i, c in enumerate(curves):
    if not c:
      continue
    best = int(np.argmax(c["J"]))
    rows.append([f"{res['lambdas'][i]:g}", f"{res['kl_weight'][i]:g}",
                 str(res["retrained_steps"][i]),
                 "yes" if res["retrained_stopped_by_rule"][i] else "**no** (cap)",
                 f"{f(c['J'][-1])} ± {f(c['J_se'][-1])}",
                 f"{f(c['J'][best])} (step {c['step'][best]})", f(res["optimum_J"][i]),
                 f"{f(res['retrained_J'][i])} ± {f(res['retrained_J_se'][i])}",
                 "yes" if res["retrained_converged"][i] else "**no**"])
  lines += [rep.markdown_table(
      ["lambda", "beta'", "steps", "stopped by the rule", "last training-eval J",
       "best training-eval J", "J*", "study J (final model)", "within tolerance of J*"],
      rows), "",
      "Training-eval J: the curve's points (one sample per prompt); study J: the final "
      "model's samples of the tables above.", "",
      "![J over PPO training, per beta', J* dashed](ppo_training_curves.png)", ""]
  return lines


def _setup_lines(res: dict) -> list:
  """What was run: the model, the budget, the evaluation, the reward window, the comparison."""
  s = res["settings"]
  return [
      f"Model: `{s['model']}`; task `{s['task']}`; SFT {s['sft_steps']} steps, every PPO run "
      + (f"to convergence (at most {s['ppo_steps']} steps; see below)"
         if (s.get("ppo_convergence") or {}).get("stop_window") else f"{s['ppo_steps']} steps")
      # NOTE: not an f-string (as the shipped reports were written): the prompt count is
      # printed as its template, {s['num_eval_prompts']}.
      + ". Evaluation: the first {s['num_eval_prompts']} prompts of the "
      f"`{s['eval_split']}` split, {s['num_samples']} samples each at temperature 1 "
      f"({res['num_rows_per_lambda']} responses per lambda and model), at most "
      f"{res['max_new_tokens']} tokens.", "",
      f"Length reward (eq. 10): 0 if {res['window'][0]} <= |y| <= {res['window'][1]} tokens, "
      f"else -1. SFT samples fall in that window **{100 * res['sft_in_range_fraction']:.1f}%** "
      f"of the time (measured in this run; required below "
      f"{100 * res['max_sft_in_range']:.0f}%).", "",
      f"Base PPO at beta = {res['beta']:g}; DeRa mixes the logits of the SFT model and that "
      f"PPO model with weight lambda, all lambdas in one batched sampling call. Retrained: PPO "
      f"from the same SFT model at beta / lambda (lambda = 0: the SFT model itself"
      + ("; lambda = 1: the base run, reused" if s["retrained_names"].get("1") ==
         beta_name(res["beta"]) else "") + ").", ""]


def _results_section(res: dict) -> list:
  """The table of reward, KL and length per lambda, DeRa and retrained side by side."""
  f = rep.fmt
  rows = []
  for i, x in enumerate(res["lambdas"]):
    rb = res["retrained_beta"][i]
    rows.append([f"{x:g}", "inf" if rb is None else f"{rb:g}",
                 f"{f(res['dera_reward'][i])} ± {f(res['dera_reward_se'][i])}",
                 f"{f(res['retrained_reward'][i])} ± {f(res['retrained_reward_se'][i])}",
                 f"{f(res['dera_kl'][i])} ± {f(res['dera_kl_se'][i])}",
                 f"{f(res['retrained_kl'][i])} ± {f(res['retrained_kl_se'][i])}",
                 f"{f(res['dera_length'][i], 1)}", f"{f(res['retrained_length'][i], 1)}"])
  return ["## Results", "", rep.markdown_table(
      ["lambda", "retrained beta", "DeRa reward", "retrained reward", "DeRa KL (nats)",
       "retrained KL (nats)", "DeRa length", "retrained length"], rows), "",
      "Means ± standard errors (clustered by prompt). KL is the exact sequence KL to the SFT "
      "model (sum over steps of the full-vocabulary KL along the sampled responses).", ""]


def _tracking_section(res: dict) -> list:
  """Does DeRa track retraining: Pearson's r, the disagreements, the pipeline's checks."""
  f = rep.fmt
  lam = res["lambdas"]
  p = res["pearson"]
  lines = ["## Does DeRa track retraining?", "",
           f"- Pearson correlation of the mean rewards of DeRa and the retrained models across "
           f"the {len(lam)} lambdas: **{f(p)}**" + (" (undefined: a constant curve)"
                                                       if p is None else "")
           + rep.ci_text(res.get("pearson_ci")) + "; of their KLs: " f"{f(res['pearson_kl'])}."]
  dis = res["reward_disagreement_lambdas"]
  family = rep.FAMILY_TEXT + "; lambda = 0 and 1 are one model on both sides"
  if dis:
    lines.append(f"- **DeRa and retraining disagree** on the mean reward ({family}) at lambda = "
                 f"{', '.join(f'{x:g}' for x in dis)}.")
  else:
    compared = rep.comparisons(lam, res["dera_reward"], res["dera_reward_se"],
                               res["retrained_reward"], res["retrained_reward_se"])
    lines.append(f"- At no lambda do the mean rewards of DeRa and retraining differ ({family})."
                 if compared else "- No lambda compares DeRa with a separately retrained model "
                 "(at lambda = 0 and 1 they are one model), so nothing is called.")
  if p is not None and p < 0.9:
    lines.append("- The correlation is below 0.9: on this run DeRa is a weak proxy for "
                 "retraining.")
  for k, v in res["identical_samples_fraction"].items():
    lines.append(f"- Check: at lambda = {k}, DeRa's samples equal the "
                 f"{'SFT' if k == '0' else 'base PPO'} model's token for token in "
                 f"{100 * v:.0f}% of rows (same row seeds; expected 100%).")
  return lines


def render_report(res: dict) -> str:
  lines = ["# Length-reward study (DeRa paper, Figure 2), toy scale", "", *_setup_lines(res),
           *_results_section(res), *_tracking_section(res)]
  lines += ["", *optimum_section(res)]
  lines += ["", *training_section(res)]
  lines += ["", "## Is the base beta over- or under-regularised?", ""]
  dv, rv = res["dera_verdict"], res["retrained_verdict"]
  lines.append(f"- From DeRa's reward curve: **{dv['verdict']}**: {dv['reason']}.")
  lines.append(f"- From the retrained models: **{rv['verdict']}**: {rv['reason']}.")
  if dv["verdict"] != rv["verdict"]:
    lines.append("- The two verdicts differ: DeRa and retraining disagree on this point.")
  lines += ["", "## Figures", "",
            "![reward against lambda](fig2a_reward_vs_lambda.png)", "",
            "![KL against lambda](kl_vs_lambda.png)", "",
            "![reward against KL with the optimum](reward_vs_kl.png)", "",
            "![regularised objective against lambda](objective_vs_lambda.png)", "",
            "![DeRa lengths](fig2b_dera_lengths.png)", "",
            "![retrained lengths](fig2c_retrained_lengths.png)", "",
            "![lengths, DeRa and retrained side by side](lengths_by_lambda.png)", "",
            "## Time", ""]
  lines += rep.time_section(res)
  return "\n".join(lines) + "\n"
