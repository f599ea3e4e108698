"""Numbers, verdicts and figures of the studies, computed from stage outputs.

Everything a report states comes from here, from the runs: per-lambda means
with standard errors, the Pearson correlation between DeRa and retraining,
where the two disagree, whether the base beta looks over- or
under-regularised, and the PNG figures (matplotlib, Agg backend).
"""

import json
import math
import os
from typing import Optional, Sequence

import numpy as np

from realign_jax.checkpoints.manager import atomic_write_text
from realign_jax.errors import UserError
from realign_jax.evaluation import stats
from realign_jax.evaluation.records import check_lambda_grid

# NOTE: two standard errors of a difference: the threshold for "differs" everywhere.
Z = 2.0


def check_lambdas(lambdas: Sequence[float], what: str = "lambda grid") -> list:
  """Distinct finite lambdas >= 0, else a one-line UserError."""
  grid = check_lambda_grid(list(lambdas), what)
  neg = [lam for lam in grid if lam < 0]
  if neg:
    raise UserError(f"{what} holds negative values: {neg}")
  return grid


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


def disagreements(lambdas, a, a_se, b, b_se) -> list:
  """Lambdas where two curves differ by more than Z standard errors of the difference.

  A lambda with an undefined (NaN or None) standard error is never listed.
  """
  out = []
  for lam, x, sx, y, sy in zip(lambdas, a, a_se, b, b_se):
    if not (_defined(sx) and _defined(sy)):
      continue
    if abs(x - y) > Z * math.sqrt(sx * sx + sy * sy) + 1e-12:
      out.append(lam)
  return out


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
def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path: str) -> str:
  tmp = f"{path}.tmp-{os.getpid()}.png"
  fig.savefig(tmp, dpi=110, bbox_inches="tight")
  os.replace(tmp, path)
  return path


def plot_curves(path: str, lambdas, curves: dict, *, ylabel: str, title: str,
                xlabel: str = "lambda", hline: Optional[float] = None) -> str:
  """Lines with error bars: curves = {label: (values, standard errors)}; `hline` a reference."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5.2, 3.6))
  if hline is not None:
    ax.axhline(hline, color="red", linewidth=1.0, alpha=0.6)
  for label, (vals, ses) in curves.items():
    ax.errorbar(lambdas, vals, yerr=ses, marker="o", capsize=3, label=label)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  out = _save(fig, path)
  plt.close(fig)
  return out


def plot_histograms(path: str, lengths_by_lam: dict, *, window: Optional[tuple], title: str,
                    max_length: int) -> str:
  """Step histograms of response lengths, one per lambda, the rewarded window shaded."""
  plt = _plt()
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
  out = _save(fig, path)
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


def write_outputs(model_dir: str, results: dict, figures: dict, render) -> dict:
  """Writes MODEL_DIR/results.json and report.md (`render(results)`) atomically.

  Returns `results` with the figure file names, and the paths of the report
  and the figures for the binary to print.
  """
  results["figures"] = {k: os.path.basename(v) for k, v in figures.items()}
  atomic_write_text(os.path.join(model_dir, "results.json"),
                    json.dumps(stats.clean_for_json(results), indent=1))
  atomic_write_text(os.path.join(model_dir, "report.md"), render(results))
  results["report"] = os.path.join(model_dir, "report.md")
  results["figure_paths"] = figures
  return results
