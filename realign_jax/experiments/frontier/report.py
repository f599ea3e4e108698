"""The frontier study's report.md and frontier.png, from its results (`results.build_results`)."""

import os

from realign_jax.evaluation import optimum as opt
from realign_jax.experiments import report as rep
from realign_jax.experiments.frontier.config import METHODS

LABELS = {"best_of_n": "best-of-n", "ppo": "PPO (retrained per beta)", "dera": "DeRa (lambda)",
          "cd_token_fudge": "token-wise CD, FUDGE", "cd_token_q": "token-wise CD, Q-head",
          "cd_block": "blockwise CD (K)",
          "tq_direct": "Transfer Q* direct (alpha)", "args": "ARGS (w)"}


def optimum_label(best: dict) -> str:
  if best["kind"] == "exact":
    if len(best["levels"]) == 1:
      return "KL-regularised optimum: the SFT model itself (one reward value)"
    return (f"exact KL-regularised optimum (closed form, SFT success rate p0 = "
            f"{100 * best['p0']:.1f}%)")
  return (f"KL-regularised optimum, estimated (self-normalised, "
          f"{best['num_samples']} SFT samples)")


def _curve(e: dict) -> str:
  """The part of a setting that makes a separate curve: the candidate count k."""
  return "k=" + e["setting"].split(",k=")[-1] if ",k=" in (e["setting"] or "") else ""


def _curves(entries: list) -> list:
  """(method, curve) in METHODS order, curves in order of appearance."""
  seen = []
  for method in METHODS:
    for e in entries:
      if e["method"] == method and (method, _curve(e)) not in seen:
        seen.append((method, _curve(e)))
  return seen


def plot_frontier(path: str, results: dict) -> str:
  plt = rep.pyplot()
  fig, ax = plt.subplots(figsize=(7.0, 4.8))
  markers = dict(zip(METHODS, "os^v<>Dp"))
  best = results.get("optimum") or {"kind": None}  # NOTE: absent from older results
  if best["kind"] is not None:
    ck, cr = list(best["kl"]), list(best["reward"])
    # NOTE: beyond its largest KL the optimum's reward stays at the reward's maximum.
    far = max([e["kl"] for e in results["entries"] if e.get("kl") is not None] + [ck[-1]])
    if far > ck[-1]:
      ck, cr = ck + [far], cr + [cr[-1]]
    ax.plot(ck, cr, color="black", linewidth=1.6, label=optimum_label(best))
    if best["kind"] == "estimate" and any(best["small_ess"]):
      lo = min(k for k, f in zip(best["kl"], best["small_ess"]) if f)
      ax.axvspan(lo, max(ck), color="grey", alpha=0.1,
                 label=f"optimum estimate unreliable (ESS < "
                       f"{100 * opt.SMALL_ESS_FRACTION:.0f}% of samples)")
  for method, curve in _curves(results["entries"]):
    es = [e for e in results["entries"] if e["method"] == method and _curve(e) == curve]
    # NOTE: points joined in the order of the method's grid (n, lambda, beta, ...).
    exact = es[0]["kl_kind"] == "exact"
    label = LABELS[method] + (f" ({curve})" if curve else "") + (
        "" if exact else " [KL: best-of-n estimator]")
    line = ax.errorbar([e["kl"] for e in es], [e["reward"] for e in es],
                       xerr=[e["kl_se"] for e in es], yerr=[e["reward_se"] for e in es],
                       marker=markers[method], capsize=2, linewidth=1.2, label=label,
                       markerfacecolor=None if exact else "none")
    if not exact:
      ax.plot([e["kl_bound"] for e in es], [e["reward"] for e in es], linestyle=":",
              color=line[0].get_color(), marker=markers[method], markerfacecolor="none",
              alpha=0.6, label=f"{LABELS[method]} [KL: bound log n - (n-1)/n]")
    if es[0].get("kl_levels") is not None:
      ax.plot([e["kl_levels"] for e in es], [e["reward"] for e in es], linestyle="--",
              color=line[0].get_color(), marker=markers[method], markerfacecolor="none",
              alpha=0.6, label=f"{LABELS[method]} [KL: exact by reward level, plug-in]")
  ax.set_xscale("symlog", linthresh=0.1)
  ax.set_xlabel("KL(pi || pi_ref), nats (filled: exact; hollow: best-of-n estimates)")
  ax.set_ylabel("mean task reward")
  ax.set_title("Reward against KL to the SFT model")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
            title=rep.SE_NOTE, title_fontsize=7)
  out = rep.save_figure(fig, path)
  plt.close(fig)
  return out


def _q_candidates(top_ks) -> str:
  ks = [top_ks] if isinstance(top_ks, int) else top_ks  # NOTE: one int in older results
  return " and ".join(f"the top {k}" if k else "the whole vocabulary" for k in ks)


def _q_head_label(settings: dict) -> str:
  head = settings.get("cdq_output_head", "lm")  # NOTE: older results used the plain Q-head
  return ("dueling Q-head (V(s) + A(s, z), unvisited tokens at V(s))" if "dueling" in head
          else "Q-head")


def optimum_section(res: dict) -> list:
  """What the optimum's curve is, where it comes from, and who comes closest to it."""
  f = rep.fmt
  best = res.get("optimum") or {"kind": None, "reason": "not computed by this version"}
  lines = ["## Against the KL-regularised optimum", ""]
  if best["kind"] is None:
    return lines + [f"No optimum: {best['reason']}.", ""]
  lines.append(
      "For each KL weight beta the policy maximising E[r] - beta KL(pi || p) is p exp(r / beta) "
      "/ Z; its (KL, reward) pairs over beta are the best any method can reach, the black "
      "curve in the figure. `optimum at this KL` is that curve's reward at the entry's KL "
      "(of the entry's kind), `gap to optimum` that minus the entry's reward (> 0: below the "
      "optimum).")
  if best["kind"] == "exact":
    lines.append(
        f"The reward takes {len(best['levels'])} value(s) in the {best['num_samples']} samples "
        f"of the SFT model (the best_of_n stage)" + (
            f", {best['levels'][1]:g} with probability p0 = {100 * best['p0']:.1f}%: the curve "
            f"is the exact KL-regularised optimum (closed form from p0), from KL 0 (reward "
            f"{f(best['reference_reward'])}) to KL -log p0 = {f(best['kl'][-1])} nats (reward "
            f"{f(best['reward'][-1])})."
            if len(best["levels"]) == 2 else ": the SFT model is already optimal."))
  else:
    small = [k for k, s in zip(best["kl"], best["small_ess"]) if s]
    lines.append(
        f"The reward takes more than two values: the curve is the self-normalised estimate "
        f"from the {best['num_samples']} samples of the SFT model (weights exp(r / beta); "
        f"standard errors by the delta method, clustered by prompt, in results.json)." + (
            f" **Beyond KL {f(min(small))} nats the effective sample size falls below "
            f"{100 * opt.SMALL_ESS_FRACTION:.0f}% of the samples: the estimate there rests on a "
            f"few responses.**" if small else ""))
  gaps = [e for e in res["entries"] if e.get("gap_to_optimum") is not None]
  if gaps:
    near = min(gaps, key=lambda e: e["gap_to_optimum"])
    far = max(gaps, key=lambda e: e["gap_to_optimum"])
    def where(e):
      g = e["gap_to_optimum"]
      return (f"{f(g)} below it" if g >= 0 else f"{f(-g)} above it: sampling noise or a KL "
              f"underestimate, since no policy beats the optimum") + f" at {f(e['kl'])} nats"
    lines.append(f"Closest to the optimum: {LABELS[near['method']]} {near['setting'] or ''} "
                 f"({where(near)}); farthest: {LABELS[far['method']]} {far['setting'] or ''} "
                 f"({where(far)}).")
  return lines + [""]


def render_report(res: dict) -> str:
  f = rep.fmt
  s = res["settings"]
  lines = ["# Reward against KL: every alignment method on one task", "",
           f"Task `{s['task']}`, reward `{s['reward']}`; model {s['model']}; SFT {s['sft_steps']} "
           f"steps, PPO {s['ppo_steps']} steps per beta, value models {s['value_steps']} steps. "
           f"Evaluation: the first {s['num_prompts']} prompts of `{s['split']}`, "
           f"{s['num_samples']} samples each (best-of-n: its own draw), temperature 1, at most "
           f"{s['max_new_tokens']} tokens. DeRa and Transfer Q* use the PPO model at beta = "
           f"{s['aligned_beta']:g}; token-wise CD scores the top {s['cd_top_k']} tokens of p "
           f"with the FUDGE value and " + _q_candidates(s["cd_q_top_k"]) +
           f" with the {_q_head_label(s)}; blockwise CD draws blocks of "
           f"{s['block_length']} tokens; TQ* takes the top {s['tq_top_k']} with rollouts of "
           f"{s['tq_horizon']} tokens" + (
               # NOTE: results written before the option existed used the authors' form.
               ", alpha as the paper's KL weight (p exp(Q / alpha): larger = closer to p)"
               if s.get("tq_alpha_convention", "authors") == "paper" else
               ", alpha as in the authors' code (log p + alpha Q: larger = further from p)") +
           f"; ARGS the top {s['args_top_k']}.", "",
           "KL kinds: **exact** = mean over responses of the sum over steps of the "
           "full-vocabulary KL of the method's per-token distribution to p; "
           "**bon_estimator** = best-of-n estimator KL_hat(p(y), n) of the kept response (per "
           "block for blockwise CD), with the bound log n - (n - 1)/n alongside. For best-of-n, "
           "`KL levels` is the exact best-of-n KL of each prompt's empirical reward distribution "
           "(its samples' reward levels): with a reward that ties, far below the bound.", ""]
  rows = []
  for e in res["entries"]:
    rows.append([LABELS[e["method"]], e["setting"] or "",
                 f"{f(e['reward'])} ± {f(e['reward_se'])}",
                 f"{f(e['kl'])} ± {f(e['kl_se'])}", e["kl_kind"], f(e.get("kl_bound")),
                 f(e.get("kl_levels")), f(e["length"], 1), "yes" if e["pareto"] else "",
                 f(e.get("optimum_reward_at_kl")), f(e.get("gap_to_optimum"))])
  lines += ["## Results", "", rep.markdown_table(
      ["method", "setting", "reward", "KL (nats)", "KL kind", "KL bound", "KL levels",
       "length", "on the frontier", "optimum at this KL", "gap to optimum"], rows), "",
      "Means ± standard errors (clustered by prompt; best-of-n: over prompts).", ""]
  lines += optimum_section(res)
  trunc = [e for e in res["entries"] if e["method"] == "args" and e["setting"] == "w=0"]
  if trunc:
    t = trunc[0]
    lines += [f"Sampling p truncated to its top {s['args_top_k']} tokens (ARGS at w = 0) costs "
              f"{f(t['kl'])} nats of KL by itself (reward {f(t['reward'])}): every method that "
              f"restricts each step to the top-k of p (token-wise CD over the top-k, Transfer Q*, "
              f"ARGS) starts from about there.", ""]
  lines += ["## The frontier", "",
            "Entries no other entry beats on both reward and KL (point estimates), by KL: " +
            "; ".join(f"{LABELS[m]} {st or ''}".strip() for m, st in res["pareto"]) + ".", ""]
  brow = [[f"{b['budget']:g}", "none" if b["method"] is None else
           f"{LABELS[b['method']]} {b['setting'] or ''}".strip(), f(b["reward"]), f(b["kl"])]
          for b in res["budgets"]]
  lines += ["Best mean reward within a KL budget:", "",
            rep.markdown_table(["KL budget (nats)", "method", "reward", "KL"], brow), ""]
  lines += ["## Figure", "", "![reward against KL](frontier.png)", "", "## Time", ""]
  st = res["stage_seconds"]
  extra = {e["stage"]: e for e in res["entries"]}
  lines.append(rep.markdown_table(
      ["stage", "wall seconds", "decode tokens/s", "compile s"],
      [[k, f"{v:.0f}" if v == v else "n/a", f(extra.get(k, {}).get("tokens_per_s"), 0),
        f(extra.get(k, {}).get("compile_s"), 1)] for k, v in st.items()]))
  lines += ["", f"This invocation: {res['invocation_seconds']:.0f} s wall on {os.cpu_count()} "
            f"cores (stages run now: {', '.join(res['stages_run_now']) or 'none, all cached'})."]
  return "\n".join(lines) + "\n"
