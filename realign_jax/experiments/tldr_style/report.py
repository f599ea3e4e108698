"""The TL;DR-style study's report.md and figures, from its results (`results.build_results`)."""

import functools
import os

from realign_jax.experiments import report as rep
from realign_jax.experiments.tldr_style.config import FAMILIES


_TITLES = {"pg": "policy gradient", "dpo": "DPO"}


def write_figures(model_dir: str, res: dict) -> dict:
  lam = res["lambdas"]
  figs = {}
  fig_no = {"pg": "3", "dpo": "7"}
  for family in FAMILIES:
    if family not in res:
      continue
    f = res[family]
    n, t = fig_no[family], _TITLES[family]
    curves = lambda key: {"DeRa": (f[f"dera_{key}"], f[f"dera_{key}_se"]),
                          "retrained at beta / lambda": (f[f"retrained_{key}"],
                                                         f[f"retrained_{key}_se"])}
    flat = lambda v: [v] * len(lam)  # a labelled horizontal reference line
    plot = functools.partial(rep.plot_lambda_curves, base_beta=res["beta"])
    figs[f"{family}_vs_sft"] = plot(
        os.path.join(model_dir, f"fig{n}a_{family}_winrate_vs_sft.png"), lam,
        curves("winrate_vs_sft"), ylabel="gold win rate against SFT",
        title=f"({t}) against the SFT model (Fig. {n}a)",
        lines={"base model (beta, lambda = 1)": flat(f["base"]["winrate_vs_sft"])})
    figs[f"{family}_vs_base"] = plot(
        os.path.join(model_dir, f"fig{n}b_{family}_winrate_vs_base.png"), lam,
        curves("winrate_vs_base"), ylabel="gold win rate against base",
        title=f"({t}) against the base aligned model (Fig. {n}b)",
        lines={"a tie (0.5)": flat(0.5)})
    figs[f"{family}_vs_retrained"] = plot(
        os.path.join(model_dir, f"fig{n}c_{family}_dera_vs_retrained.png"), lam,
        {"DeRa against retrained": (f["dera_winrate_vs_retrained"],
                                    f["dera_winrate_vs_retrained_se"])},
        ylabel="gold win rate", title=f"({t}) DeRa against retrained (Fig. {n}c)",
        lines={"a tie (0.5)": flat(0.5)})
    figs[f"{family}_pairwise"] = plot(
        os.path.join(model_dir, f"fig6_{family}_pairwise_accuracy.png"), lam,
        curves("pairwise_accuracy"), ylabel="pairwise accuracy (eq. 14)",
        title=f"({t}) pairwise accuracy, held-out pairs (Fig. 6)",
        lines={"SFT model": flat(res["sft_pairwise_accuracy"])})
    figs[f"{family}_kl"] = plot(
        os.path.join(model_dir, f"kl_{family}.png"), lam, curves("kl"),
        ylabel="KL(pi || pi_ref), nats", title=f"({t}) KL to the SFT model")
  return figs


def _pm(x, se) -> str:
  return f"{rep.fmt(x)} ± {rep.fmt(se)}"


def _family_section(res: dict, family: str) -> list:
  f, lam = res[family], res["lambdas"]
  t = _TITLES[family]
  fig = {"pg": "3", "dpo": "7"}[family]
  b = f["base"]
  lines = [f"## {t}: DeRa against retraining (Fig. {fig}" + (", Fig. 6)" if family == "pg"
                                                            else ")"), "",
           f"Base model: {t} at beta = {res['beta']:g} (`{f['retrained_runs'][lam.index(1.0)]}`"
           if 1.0 in lam else f"Base model: {t} at beta = {res['beta']:g}",
           ]
  lines[-1] += (f"; gold win rate against SFT {_pm(b['winrate_vs_sft'], b['winrate_vs_sft_se'])},"
                f" mean gold {rep.fmt(b['gold'])}, mean learned reward {rep.fmt(b['reward'])}, "
                f"KL {rep.fmt(b['kl'])} nats" + (")." if 1.0 in lam else "."))
  lines.append("")
  rows = []
  for i, x in enumerate(lam):
    rows.append([f"{x:g}", f"{f['retrained_beta'][i]:g}",
                 _pm(f["dera_winrate_vs_sft"][i], f["dera_winrate_vs_sft_se"][i]),
                 _pm(f["retrained_winrate_vs_sft"][i], f["retrained_winrate_vs_sft_se"][i]),
                 _pm(f["dera_winrate_vs_base"][i], f["dera_winrate_vs_base_se"][i]),
                 _pm(f["retrained_winrate_vs_base"][i], f["retrained_winrate_vs_base_se"][i]),
                 _pm(f["dera_winrate_vs_retrained"][i], f["dera_winrate_vs_retrained_se"][i]),
                 f"{rep.fmt(f['dera_kl'][i])} / {rep.fmt(f['retrained_kl'][i])}",
                 f"{rep.fmt(f['dera_gold'][i])} / {rep.fmt(f['retrained_gold'][i])}",
                 f"{rep.fmt(f['dera_learned_reward'][i])} / "
                 f"{rep.fmt(f['retrained_learned_reward'][i])}",
                 f"{rep.fmt(f['dera_pairwise_accuracy'][i])} / "
                 f"{rep.fmt(f['retrained_pairwise_accuracy'][i])}"])
  lines += [rep.markdown_table(
      ["lambda", "retrained beta", "DeRa vs SFT", "retrained vs SFT", "DeRa vs base",
       "retrained vs base", "DeRa vs retrained", "KL DeRa / retr.", "gold DeRa / retr.",
       "learned reward DeRa / retr.", "pair. acc. DeRa / retr."], rows), ""]
  p = f["pearson"]
  lines.append(f"- Pearson correlation between DeRa and the retrained models across the "
               f"{len(lam)} lambdas: win rate against SFT **{rep.fmt(p['winrate_vs_sft'])}**"
               f"{rep.ci_text(f.get('pearson_ci', {}).get('winrate_vs_sft'))}; "
               f"against the base model {rep.fmt(p['winrate_vs_base'])}; mean gold reward "
               f"{rep.fmt(p['gold'])}; pairwise accuracy {rep.fmt(p['pairwise_accuracy'])}; "
               f"KL {rep.fmt(p['kl'])} (n/a: undefined, a constant curve or one lambda).")
  for name, dis in f["disagreement_lambdas"].items():
    if dis:
      lines.append(f"- **DeRa and retraining disagree** on {name.replace('_', ' ')} "
                   f"({rep.FAMILY_TEXT}) at lambda = {', '.join(f'{x:g}' for x in dis)}.")
  if not any(f["disagreement_lambdas"].values()):
    lines.append(f"- At no lambda do DeRa and retraining differ on any of these measures "
                 f"({rep.FAMILY_TEXT}).")
  if p["winrate_vs_sft"] is not None and p["winrate_vs_sft"] < 0.9:
    lines.append("- The win-rate correlation is below 0.9: on this run DeRa is a weak proxy "
                 "for retraining.")
  dv, rv = f["dera_verdict"], f["retrained_verdict"]
  lines.append(f"- Base beta, from DeRa's win rates against SFT: **{dv['verdict']}**: "
               f"{dv['reason']}.")
  lines.append(f"- From the retrained models: **{rv['verdict']}**: {rv['reason']}.")
  if dv["verdict"] != rv["verdict"]:
    lines.append("- The two verdicts differ: DeRa and retraining disagree on this point.")
  if "identical_samples_fraction_lambda1" in f:
    lines.append(f"- Check: at lambda = 1 DeRa's samples equal the base model's token for "
                 f"token in {100 * f['identical_samples_fraction_lambda1']:.0f}% of rows (same "
                 f"row seeds; expected 100%).")
  lines.append("")
  return lines


def render_report(res: dict) -> str:
  s = res["settings"]
  lines = ["# TL;DR-style study (DeRa paper, Figures 3, 6, 7), toy scale", ""]
  tr = res["preference_pairs"].get("train", {})
  ho = res["preference_pairs"].get(s["heldout_split"], {})
  rm = res["reward_model"]
  human = tr.get("source") == "tldr_comparisons"
  lines += [
      f"Model: `{s['model']}`; task `{s['task']}`; SFT {s['sft_steps']} steps, reward model "
      f"{s['reward_model_steps']} steps, every PG run {s['pg_steps']} steps"
      + (f", every DPO run {s['dpo_steps']} steps" if s.get("dpo_steps") else "") + ".", "",
      f"**Gold reward** (standing for summary quality): the {res['gold_reward']} of the prompt "
      f"(word-level longest common subsequence, harmonic mean of precision and recall). It "
      + (f"judges every win rate; no trained model sees it directly." if human else
         f"labels the synthetic preference pairs and judges every win rate; no trained model "
         f"sees it directly."), "",
      (f"Preference pairs: human comparisons of the TL;DR release (`tldr_comparisons`): "
       f"{tr.get('pairs')} training pairs of `train` (skipped as invalid: "
       f"{tr.get('skipped_invalid')}), {ho.get('pairs')} held-out pairs of "
       f"`{s['heldout_split']}`. " if human else
       f"Preference pairs: two SFT samples per prompt, the higher gold score `chosen`: "
       f"{tr.get('pairs')} training pairs from {tr.get('prompts')} `train` prompts "
       f"(skipped: {tr.get('ties')} ties, {tr.get('identical')} identical, {tr.get('empty')} "
       f"empty), {ho.get('pairs')} held-out pairs from {ho.get('prompts')} "
       f"`{s['heldout_split']}` prompts. ") + "Bradley-Terry reward model: held-out accuracy "
      f"{_pm(rm['heldout_accuracy'], rm['heldout_accuracy_se'])} on "
      f"{rm['heldout_pairs']} pairs.", "",
      f"Evaluation: the first {s['num_eval_prompts']} prompts of `{s['eval_split']}`, "
      f"{s['num_samples']} samples each at temperature 1 ({res['num_rows_per_lambda']} "
      f"responses per model), at most {s['max_new_tokens']} tokens, the same row seeds "
      f"everywhere. Win rates by the gold judge (ties 1/2, pair order randomised), "
      f"± a standard error; KL is the exact sequence KL to the SFT model (nats); pairwise "
      f"accuracy is eq. (14) on the {res['num_heldout_pairs']} held-out pairs (SFT model: "
      f"{_pm(res['sft_pairwise_accuracy'], res['sft_pairwise_accuracy_se'])}). SFT samples: "
      f"mean gold {rep.fmt(res['sft']['gold'])}, mean learned reward "
      f"{rep.fmt(res['sft']['reward'])}.", ""]
  for family in FAMILIES:
    if family in res:
      lines += _family_section(res, family)
  lines += ["## Figures", ""]
  for name in res.get("figures", {}).values():
    lines += [f"![{name[:-4]}]({name})", ""]
  lines += ["## Time", ""]
  lines += rep.time_section(res)
  return "\n".join(lines) + "\n"
