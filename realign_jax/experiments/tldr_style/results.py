"""The TL;DR-style study's numbers, from its decode rows: every field of results.json.

Per family (PG on the learned reward, DPO) and lambda: the gold judge's win
rates of DeRa and of the model retrained at beta / lambda against the SFT
model, the base model and each other (Figures 3, 7), their mean gold and
learned rewards, KL and pairwise accuracy (Figure 6); Pearson's r of the
curves, where they disagree, and the verdicts on the base beta.
"""

from realign_jax.decoding.lambda_grid import LambdaGrid
from realign_jax.plumbing.errors import UserError
from realign_jax.evaluation import win_rate as win_rate_lib
from realign_jax.experiments import report as rep
from realign_jax.experiments.samples import identical_fraction, keyed, rows_at
from realign_jax.experiments.tldr_style.gold import GOLD_NAME, gold_judge


def _win(judge, refs, rows_1, rows_2, seed: int) -> dict:
  """Gold-judge win rate of rows_1 over rows_2, paired by (prompt, sample)."""
  a, b = keyed(rows_1), keyed(rows_2)
  if set(a) != set(b):
    raise UserError(f"win rate: the two sides hold different (prompt, sample) rows "
                    f"({len(a)} vs {len(b)})")
  keys = sorted(a)
  return win_rate_lib.win_rate(judge, [refs[k[0]] for k in keys],
                               [a[k]["response"] for k in keys],
                               [b[k]["response"] for k in keys], seed=seed)


def family_results(lambdas, beta, sft_rows, fam, pw, refs, judge_seed) -> dict:
  """Win rates (Fig. 3 a-c / 7 a-b), rewards, KL and pairwise accuracy of one family."""
  judge = gold_judge()
  dera_by = {lam: rows_at(fam["dera"], lam) for lam in lambdas}
  retr = fam["retrained"]
  out = {"retrained_beta": [beta / lam for lam in lambdas],
         "retrained_runs": [fam["names"][lam] for lam in lambdas]}

  def curve(key, fn):
    res = [fn(lam) for lam in lambdas]
    out[key] = [r["win_rate"] for r in res]
    out[key + "_se"] = [r["win_rate_se"] for r in res]
    out[key + "_counts"] = [{k: r[k] for k in ("wins", "losses", "ties", "num_judged",
                                               "num_failed")} for r in res]
  curve("dera_winrate_vs_sft", lambda lam: _win(judge, refs, dera_by[lam], sft_rows, judge_seed))
  curve("retrained_winrate_vs_sft",
        lambda lam: _win(judge, refs, retr[lam], sft_rows, judge_seed))
  curve("dera_winrate_vs_base",
        lambda lam: _win(judge, refs, dera_by[lam], fam["base"], judge_seed))
  curve("retrained_winrate_vs_base",
        lambda lam: _win(judge, refs, retr[lam], fam["base"], judge_seed))
  curve("dera_winrate_vs_retrained",
        lambda lam: _win(judge, refs, dera_by[lam], retr[lam], judge_seed))
  for prefix, by in (("dera", dera_by), ("retrained", retr)):
    summ = [rep.summarize_rows(by[lam], fields=("reward", "gold", "kl", "length"))
            for lam in lambdas]
    for f, key in (("gold", "gold"), ("reward", "learned_reward"), ("kl", "kl"),
                   ("length", "length")):
      out[f"{prefix}_{key}"] = [s[f] for s in summ]
      out[f"{prefix}_{key}_se"] = [s[f + "_se"] for s in summ]
  for prefix in ("dera", "retrained"):
    out[f"{prefix}_pairwise_accuracy"] = [p["pairwise_accuracy"] for p in pw[prefix]]
    out[f"{prefix}_pairwise_accuracy_se"] = [p["pairwise_accuracy_se"] for p in pw[prefix]]
  pairs = (("winrate_vs_sft", "dera_winrate_vs_sft", "retrained_winrate_vs_sft"),
           ("winrate_vs_base", "dera_winrate_vs_base", "retrained_winrate_vs_base"),
           ("gold", "dera_gold", "retrained_gold"),
           ("pairwise_accuracy", "dera_pairwise_accuracy", "retrained_pairwise_accuracy"),
           ("kl", "dera_kl", "retrained_kl"))
  out["pearson"] = {name: rep.pearson(out[a], out[b]) for name, a, b in pairs}
  out["pearson_ci"] = {name: rep.pearson_ci(out[a], out[b]) for name, a, b in pairs}
  out["disagreement_lambdas"] = {
      name: rep.disagreements(lambdas, out[a], out[a + "_se"], out[b], out[b + "_se"])
      for name, a, b in pairs if name != "kl"}
  # NOTE: lambda = 0 is the SFT model itself, whose win rate against itself is
  # exactly 1/2 (every pair a tie) at KL 0: with it the verdict can also say
  # that alignment gained nothing.
  for prefix, who in (("dera", "DeRa"), ("retrained", "the model retrained")):
    out[f"{prefix}_verdict"] = rep.regularisation_verdict(
        [0.0] + lambdas, [0.5] + out[f"{prefix}_winrate_vs_sft"],
        [0.0] + out[f"{prefix}_winrate_vs_sft_se"], [0.0] + out[f"{prefix}_kl"], who)
  base = summarize_base(fam["base"], sft_rows, refs, judge, judge_seed)
  out["base"] = base
  # NOTE: DeRa at lambda = 1 samples the base model with the same row seeds:
  # identical tokens are a check of the whole pipeline.
  if 1.0 in lambdas:
    out["identical_samples_fraction_lambda1"] = identical_fraction(dera_by[1.0], fam["base"])
  return out


def summarize_base(base_rows, sft_rows, refs, judge, seed) -> dict:
  s = rep.summarize_rows(base_rows, fields=("reward", "gold", "kl", "length"))
  w = _win(judge, refs, base_rows, sft_rows, seed)
  s["winrate_vs_sft"], s["winrate_vs_sft_se"] = w["win_rate"], w["win_rate_se"]
  return s


def build_results(*, lambdas, beta, sft_rows, families, pairwise_result, refs, judge_seed,
                  pair_stats, reward_model, stage_seconds, invocation_seconds, ran, settings,
                  stage_cpu_seconds=None) -> dict:
  """Every number of results.json and report.md, from the decode rows and stage results."""
  lambdas = LambdaGrid.of(lambdas, minimum=0.0, inclusive=False).list()
  out = {"lambdas": lambdas, "beta": beta, "gold_reward": GOLD_NAME,
         "sft": rep.summarize_rows(sft_rows, fields=("reward", "gold", "kl", "length")),
         "preference_pairs": pair_stats,
         "reward_model": {k: reward_model.get(k) for k in ("heldout_accuracy",
                                                           "heldout_accuracy_se",
                                                           "heldout_pairs", "step")},
         "sft_pairwise_accuracy": pairwise_result["sft"]["pairwise_accuracy"],
         "sft_pairwise_accuracy_se": pairwise_result["sft"]["pairwise_accuracy_se"],
         "num_heldout_pairs": pairwise_result["sft"]["num_pairs"]}
  for family, fam in families.items():
    out[family] = family_results(lambdas, beta, sft_rows, fam, pairwise_result[family], refs,
                                 judge_seed)
  pgr = out["pg"]
  # NOTE: the interface keys: the policy-gradient study (Figures 3 and 6) at top level.
  for key in ("dera_winrate_vs_sft", "retrained_winrate_vs_sft", "dera_winrate_vs_base",
              "retrained_winrate_vs_base", "dera_winrate_vs_retrained"):
    out[key], out[key + "_se"] = pgr[key], pgr[key + "_se"]
  out["pairwise_accuracy"] = {"dera": pgr["dera_pairwise_accuracy"],
                              "retrained": pgr["retrained_pairwise_accuracy"],
                              "dera_se": pgr["dera_pairwise_accuracy_se"],
                              "retrained_se": pgr["retrained_pairwise_accuracy_se"],
                              "sft": out["sft_pairwise_accuracy"]}
  out["pearson"] = pgr["pearson"]["winrate_vs_sft"]
  out.update(rep.timing_fields(stage_seconds, stage_cpu_seconds, invocation_seconds, ran,
                                cpu_total=False))
  out["settings"] = settings
  out["num_rows_per_lambda"] = len(sft_rows)
  return out
