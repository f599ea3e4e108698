"""Numbers, verdicts and figures of the studies, computed from stage outputs.

Everything a report states comes from here, from the runs: per-lambda means
with standard errors, the Pearson correlation between DeRa and retraining,
where the two disagree, whether the base beta looks over- or
under-regularised, and the PNG figures (matplotlib, Agg backend).
"""

import io
import json
import math
import os
from typing import Optional, Sequence

import numpy as np

from realign_jax.plumbing import paths
from realign_jax.checkpoints.manager import atomic_write_text
from realign_jax.evaluation import stats
from realign_jax.parallel import multihost

# NOTE: two standard errors of a difference: the threshold for "differs" everywhere.
Z = 2.0
# NOTE: the two-sided level of Z for one comparison (0.0455); a family of
# comparisons (several lambdas) is held to it as a whole (`disagreements`).
ALPHA = math.erfc(Z / math.sqrt(2.0))
FAMILY_TEXT = f"family-wise level {ALPHA:.3f} over the lambdas compared, Holm's correction"


def pearson(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
  """Pearson's r of two [K] sequences; None when undefined (K < 2 or a constant side)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f"pearson needs two [K] arrays, got {x.shape} and {y.shape}")
  if x.size < 2:
    return None
  dx, dy = x - x.mean(), y - y.mean()
  den = math.sqrt(float(np.sum(dx * dx)) * float(np.sum(dy * dy)))
  if den == 0.0:
    return None
  return float(np.clip(np.sum(dx * dy) / den, -1.0, 1.0))


def pearson_ci(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> Optional[list]:
  """[low, high]: the `level` confidence interval of Pearson's r (Fisher's z, scipy.stats).

  None when r is undefined or there are fewer than 4 points (Fisher's interval
  has K - 3 degrees of freedom). NOTE: the K points are lambdas, not samples:
  the interval treats them as independent pairs, which the curves' shared
  endpoints (lambda = 0 and 1 are one model on both sides) make optimistic.
  """
  r = pearson(x, y)
  if r is None or len(x) < 4:
    return None
  if abs(r) == 1.0:
    return [r, r]
  from scipy import stats as sps  # NOTE: lazily: scipy's import is slow
  ci = sps.pearsonr(np.asarray(x, np.float64), np.asarray(y, np.float64)).confidence_interval(
      confidence_level=level)
  return [float(ci.low), float(ci.high)]


def ci_text(ci) -> str:
  """' (95% confidence interval [a, b], ...)' for `pearson_ci`'s interval."""
  if not ci:
    return " (no confidence interval: fewer than 4 lambdas)"
  return (f" (95% confidence interval [{ci[0]:.3f}, {ci[1]:.3f}], Fisher's z over the lambdas "
          f"as independent pairs)")


def mean_se(values, groups=None) -> tuple:
  """(mean, standard error) with per-prompt clustering when groups are given.

  The standard error is NaN when it is undefined (n < 2 values, or groups):
  NOTE: not 0, which would claim an exact mean. Reports print it as "n/a"
  (`fmt`), results.json as null, and `disagreements` / `regularisation_verdict`
  draw no conclusion from it.
  """
  return stats.mean_and_stderr(values, groups)


def summarize_rows(rows: Sequence[dict], fields=("reward", "kl", "log_ratio", "length")) -> dict:
  """Mean and standard error (clustered by prompt) of each field over decode rows."""
  groups = [r["prompt_index"] for r in rows]
  out = {"num_rows": len(rows)}
  for f in fields:
    out[f], out[f + "_se"] = mean_se([r[f] for r in rows], groups)
  return out


def comparisons(lambdas, a, a_se, b, b_se) -> list:
  """[(two-sided p-value, lambda)] of the lambdas where two curves can be compared.

  Compared are the lambdas whose means and standard errors are defined (NaN or
  None: no p-value) and where the two curves are not one model (the same mean
  and standard error on both sides, as at lambda = 0 and 1 of the
  length-reward study, is no comparison). The p-value is that of
  |a - b| / sqrt(a_se^2 + b_se^2) under the normal.
  """
  from scipy import stats as sps  # NOTE: lazily: scipy's import is slow
  tests = []
  for lam, x, sx, y, sy in zip(lambdas, a, a_se, b, b_se):
    if not (_defined(sx) and _defined(sy) and _defined(x) and _defined(y)) or (
        x == y and sx == sy):
      continue
    sd = math.sqrt(sx * sx + sy * sy)
    p = 0.0 if sd == 0.0 else float(2.0 * sps.norm.sf(abs(x - y) / sd))
    tests.append((p, lam))
  return tests


def disagreements(lambdas, a, a_se, b, b_se) -> list:
  """Lambdas where two curves differ, at family-wise level ALPHA over the lambdas compared.

  Holm's step-down procedure (Holm 1979) over `comparisons`' p-values keeps the
  chance of calling any agreeing lambda a disagreement below ALPHA (the level
  of Z standard errors for one comparison).
  """
  tests = comparisons(lambdas, a, a_se, b, b_se)
  out, m = [], len(tests)
  for k, (p, lam) in enumerate(sorted(tests)):
    if p > ALPHA / (m - k):
      break
    out.append(lam)
  return sorted(out)


def _defined(se) -> bool:
  return se is not None and math.isfinite(se)


def regularisation_verdict(lambdas, reward, reward_se, kl, who: str = "the model") -> dict:
  """Whether the base beta (lambda = 1) looks over- or under-regularised.

  From the shape of the reward against lambda:
  - no gain: lambda = 1 does not beat lambda = 0 (the reference) by more than
    Z standard errors of the difference: alignment gained nothing to judge;
  - over-regularised: some lambda > 1 (a weaker KL penalty) gains reward
    significantly (> Z standard errors of the difference) over lambda = 1;
  - under-regularised: some 0 < lambda < 1 (a stronger penalty) reaches the
    reward of lambda = 1 within Z standard errors at a lower KL;
  - otherwise about right: the reward rises up to lambda = 1 and gains
    nothing significant beyond.
  """
  lambdas = list(lambdas)
  if 1.0 not in lambdas:
    return {"verdict": "undetermined", "reason": "the lambda grid does not hold 1"}
  if not all(_defined(se) for se in reward_se):
    return {"verdict": "undetermined",
            "reason": f"for {who}, the standard errors of the mean rewards are undefined (fewer "
                      f"than 2 prompts or pairs), so no difference can be called significant"}
  i1 = lambdas.index(1.0)
  r1, s1 = reward[i1], reward_se[i1]
  tol = lambda i: Z * math.sqrt(reward_se[i] ** 2 + s1 ** 2) + 1e-12
  if 0.0 in lambdas:
    i0 = lambdas.index(0.0)
    if not r1 - reward[i0] > tol(i0):
      return {"verdict": "no alignment gain",
              "reason": f"{who} at lambda = 1 does not raise the mean reward significantly over "
                        f"the reference (lambda = 0): {r1:.3f} vs {reward[i0]:.3f}, so the curve "
                        f"cannot tell whether beta is too strong or too weak"}
  over = [(lam, reward[i] - r1) for i, lam in enumerate(lambdas)
          if lam > 1.0 and reward[i] - r1 > tol(i)]
  if over:
    lam, d = max(over, key=lambda t: t[1])
    return {"verdict": "over-regularised", "lambda": lam, "reward_gain": d,
            "reason": f"{who} at lambda = {lam:g} (beta / {lam:g}) raises the mean reward by "
                      f"{d:.3f} over lambda = 1, more than {Z:g} standard errors: a smaller beta "
                      f"would align further"}
  cheaper = [(lam, reward[i], kl[i]) for i, lam in enumerate(lambdas)
             if 0.0 < lam < 1.0 and reward[i] >= r1 - tol(i) and kl[i] < kl[i1]]
  if cheaper:
    lam, r, k = min(cheaper, key=lambda t: t[0])
    return {"verdict": "under-regularised", "lambda": lam,
            "reason": f"{who} at lambda = {lam:g} reaches the reward of lambda = 1 within {Z:g} "
                      f"standard errors ({r:.3f} vs {r1:.3f}) at a lower KL ({k:.3f} vs "
                      f"{kl[i1]:.3f} nats): a larger beta would lose nothing"}
  return {"verdict": "about right",
          "reason": f"for {who}, no lambda > 1 gains reward significantly over lambda = 1, and no "
                    f"lambda < 1 matches its reward at a lower KL"}


# ---- figures --------------------------------------------------------------------
def pyplot():
  """matplotlib.pyplot on the Agg backend (imported on first use: it is slow)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _primary() -> bool:
  return multihost.is_primary()


def save_figure(fig, path: str) -> str:
  """Writes the figure as a PNG at `path` (a local path or a URI), process 0 alone."""
  # NOTE: rendered to bytes, then one atomic write: the file (or object)
  # appears only complete, and savefig cannot write to a gs:// URI itself.
  if _primary():
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    paths.atomic_write_bytes(path, buf.getvalue())
  return path


# NOTE: where lambda = 0 sits on a log lambda axis: this factor below the smallest lambda > 0.
ZERO_OFFSET = 4.0
SE_NOTE = "error bars: ±1 standard error over prompts"


def lambda_positions(lambdas) -> np.ndarray:
  """x positions of `lambdas` on a log axis: lambda = 0 at an offset below the smallest > 0."""
  lam = np.asarray(lambdas, np.float64)
  pos = lam[lam > 0]
  zero_at = (pos.min() if pos.size else 1.0) / ZERO_OFFSET
  return np.where(lam > 0, lam, zero_at)


def _lambda_axis(ax, lambdas, base_beta: Optional[float]) -> None:
  """Log lambda axis (lambda = 0 at an offset, labelled), the base beta marked and, with a
  base beta, beta / lambda as a second axis on top."""
  xs = lambda_positions(lambdas)
  ax.set_xscale("log")
  ax.set_xticks(xs)
  ax.set_xticklabels(["0 (SFT)" if lam == 0 else f"{lam:.3g}" for lam in lambdas])
  ax.minorticks_off()
  ax.set_xlabel("lambda (log axis; lambda = 0 drawn at an offset)" if 0 in list(lambdas)
                else "lambda (log axis)")
  if base_beta is None:
    return
  ax.axvline(1.0, color="grey", linestyle=":", linewidth=1.0,
             label=f"base beta = {base_beta:g} (lambda = 1)")
  inv = lambda x: base_beta / np.clip(x, 1e-300, None)  # NOTE: its own inverse
  top = ax.secondary_xaxis("top", functions=(inv, inv))
  top.set_xticks([base_beta / x for x in xs])
  top.set_xticklabels(["inf" if lam == 0 else f"{base_beta / lam:.3g}" for lam in lambdas])
  top.minorticks_off()
  top.set_xlabel("beta / lambda (the KL weight each lambda stands for)")


def plot_lambda_curves(path: str, lambdas, curves: dict, *, ylabel: str, title: str,
                       base_beta: Optional[float] = None, lines: Optional[dict] = None) -> str:
  """Error-bar curves against lambda on a log axis; `lines` = {label: values} without errors
  (e.g. the optimum at beta / lambda), drawn dashed."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(5.6, 4.0))
  xs = lambda_positions(lambdas)
  for label, vals in (lines or {}).items():
    ax.plot(xs, vals, linestyle="--", color="black", marker="x", linewidth=1.2, label=label)
  for label, (vals, ses) in curves.items():
    ax.errorbar(xs, vals, yerr=_yerr(ses), marker="o", capsize=3, label=label)
  _lambda_axis(ax, lambdas, base_beta)
  return _finish(plt, fig, ax, path, ylabel=ylabel, title=title)


def _finish(plt, fig, ax, path: str, *, ylabel: str, title: str) -> str:
  """Labels, grid and the standard-error legend of a study figure; saves and closes it."""
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, title=SE_NOTE, title_fontsize=7)
  out = save_figure(fig, path)
  plt.close(fig)
  return out


def _yerr(ses):
  return [0.0 if not _defined(s) else s for s in ses]


def plot_reward_kl(path: str, curve: dict, points: dict, *, title: str,
                   curve_label: str = "exact KL-regularised optimum",
                   ylabel: str = "mean reward") -> str:
  """Reward against KL: the optimum's curve (curve["kl"], curve["reward"]) and, per label,
  points (kl, kl_se, reward, reward_se, annotations) with error bars."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(5.6, 4.0))
  ck, cr = list(curve["kl"]), list(curve["reward"])
  # NOTE: beyond its largest KL the optimum's reward stays at its last (the reward's maximum).
  far = max([k for (kl, *_rest) in points.values() for k in kl if k is not None] + [ck[-1]])
  if far > ck[-1]:
    ck, cr = ck + [far], cr + [cr[-1]]
  ax.plot(ck, cr, color="black", linewidth=1.4, label=curve_label)
  for label, (kl, kl_se, rw, rw_se, notes) in points.items():
    line = ax.errorbar(kl, rw, xerr=_yerr(kl_se), yerr=_yerr(rw_se), marker="o", capsize=3,
                       linestyle="none", label=label)
    for x, y, t in zip(kl, rw, notes):
      ax.annotate(t, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6,
                  color=line[0].get_color())
  ax.set_xlabel("KL(pi || pi_ref), nats")
  return _finish(plt, fig, ax, path, ylabel=ylabel, title=title)


def plot_training_curves(path: str, curves: dict, *, title: str,
                         ylabel: str = "J on held-out prompts") -> str:
  """One line with error bars per run over training steps, its target as a dashed line.

  curves = {label: (steps, values, standard errors, target or None)}.
  """
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6.0, 4.2))
  for label, (steps, vals, ses, target) in curves.items():
    line = ax.errorbar(steps, vals, yerr=_yerr(ses), marker=".", capsize=2, linewidth=1.2,
                       label=label)
    if target is not None:
      ax.axhline(target, color=line[0].get_color(), linestyle="--", linewidth=1.0, alpha=0.8)
  ax.set_xlabel("PPO step")
  return _finish(plt, fig, ax, path, ylabel=ylabel, title=title)


def plot_histograms(path: str, lengths_by_lam: dict, *, window: Optional[tuple], title: str,
                    max_length: int) -> str:
  """Step histograms of response lengths, one per lambda, the rewarded window shaded."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(5.2, 3.6))
  bins = np.arange(0, max_length + 2) - 0.5
  if window is not None:
    ax.axvspan(window[0] - 0.5, window[1] + 0.5, color="green", alpha=0.12,
               label=f"rewarded [{window[0]}, {window[1]}]")
  for lam, lengths in lengths_by_lam.items():
    ax.hist(lengths, bins=bins, histtype="step", density=True, linewidth=1.4,
            label=f"lambda = {lam:g}")
  ax.set_xlabel("response length (tokens)")
  ax.set_ylabel("density")
  ax.set_title(title)
  ax.legend(fontsize=7)
  out = save_figure(fig, path)
  plt.close(fig)
  return out


def plot_length_grid(path: str, lambdas, columns: dict, *, window: Optional[tuple],
                     max_length: int, title: str) -> str:
  """Small multiples of response-length histograms: one row per lambda, one column per
  model (columns = {label: {lambda: [lengths]}}), the rewarded window shaded and the
  responses cut at `max_length` (no EOS) drawn as a separate red bar, with their share."""
  plt = pyplot()
  names = list(columns)
  fig, axes = plt.subplots(len(lambdas), len(names), figsize=(2.9 * len(names),
                                                              1.25 * len(lambdas) + 0.8),
                           sharex=True, sharey=True, squeeze=False)
  bins = np.arange(0, max_length + 2) - 0.5
  for i, lam in enumerate(lambdas):
    for j, name in enumerate(names):
      ax = axes[i][j]
      lengths = np.asarray(columns[name][lam])
      cut = lengths >= max_length
      if window is not None:
        ax.axvspan(window[0] - 0.5, window[1] + 0.5, color="green", alpha=0.12)
      ax.hist(lengths[~cut], bins=bins, color="C0", weights=np.full((~cut).sum(),
                                                                    1.0 / lengths.size))
      if cut.any():
        ax.bar([max_length], [cut.mean()], width=1.0, color="red")
      ax.text(0.98, 0.9, f"cut at {max_length}: {100 * cut.mean():.0f}%", ha="right",
              va="top", transform=ax.transAxes, fontsize=6, color="red")
      if i == 0:
        ax.set_title(name, fontsize=8)
      if j == 0:
        ax.set_ylabel(f"lambda = {lam:g}", fontsize=7)
      ax.tick_params(labelsize=6)
  for ax in axes[-1]:
    ax.set_xlabel("response length (tokens, no EOS)", fontsize=7)
  fig.suptitle(title + ("" if window is None else
                        f"; green: rewarded [{window[0]}, {window[1]}]") +
               "; red: cut at the length limit", fontsize=8)
  fig.tight_layout()
  out = save_figure(fig, path)
  plt.close(fig)
  return out


def fmt(x: Optional[float], digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "n/a"
  return f"{x:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)


def timing_fields(stage_seconds: dict, stage_cpu_seconds: Optional[dict],
                  invocation_seconds: float, ran: Sequence[str], *,
                  cpu_total: bool = True) -> dict:
  """results.json's timings of a study's stages (`StageRunner` timings; NaN: unknown)."""
  wall, cpu = stage_seconds, stage_cpu_seconds or {}
  out = {"stage_seconds": wall,
         "total_stage_seconds": float(sum(v for v in wall.values() if math.isfinite(v))),
         "stage_cpu_seconds": {k: (v if math.isfinite(v) else None) for k, v in cpu.items()}}
  if cpu_total:
    out["total_stage_cpu_seconds"] = (float(sum(cpu.values())) if cpu and all(
        math.isfinite(v) for v in cpu.values()) else None)
  out["invocation_seconds"] = invocation_seconds
  out["stages_run_now"] = ran
  return out


def time_section(res: dict) -> list:
  """The report's table of stage times (`timing_fields`) and the invocation's."""
  st, cpu = res["stage_seconds"], res.get("stage_cpu_seconds") or {}
  lines = [markdown_table(
      ["stage", "wall seconds", "CPU seconds (all threads)"],
      [[k, f"{v:.0f}", "n/a" if cpu.get(k) is None else f"{cpu[k]:.0f}"] for k, v in st.items()])]
  tc = res.get("total_stage_cpu_seconds")
  lines += ["", f"Sum of stage times: {res['total_stage_seconds']:.0f} s wall"
            + ("" if tc is None else f", {tc:.0f} s CPU") + f" on {os.cpu_count()} cores. "
            f"This invocation: {res['invocation_seconds']:.0f} s wall (stages run now: "
            f"{', '.join(res['stages_run_now']) or 'none, all cached'})."]
  return lines


def write_outputs(model_dir: str, results: dict, figures: dict, render) -> dict:
  """Writes MODEL_DIR/results.json and report.md (`render(results)`) atomically.

  Returns `results` with the figure file names, and the paths of the report
  and the figures for the binary to print.
  """
  results["figures"] = {k: os.path.basename(v) for k, v in figures.items()}
  text = json.dumps(stats.clean_for_json(results), indent=1)
  report = render(results)
  if _primary():  # NOTE: every process computed the same results; one writes them
    atomic_write_text(os.path.join(model_dir, "results.json"), text)
    atomic_write_text(os.path.join(model_dir, "report.md"), report)
  results["report"] = os.path.join(model_dir, "report.md")
  results["figure_paths"] = figures
  return results
