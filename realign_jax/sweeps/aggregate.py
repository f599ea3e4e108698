"""Final metrics of a sweep's runs; mean and standard error across seeds; a plot.

A run's metrics, by the file it left (`metrics_file`, or the first present of):
  results.json    (the studies; evaluate's summary): every number in it, nested
                  keys joined by '/', list entries as name[i] (or name[axis=v])
  metrics.jsonl   (the train binary): the last row of each split, as split/name
  a .jsonl file   (decode's rows): the mean of each numeric field per lambda, name[lam=v]
A setting is the swept bindings without the seed. For each setting and metric:
mean, standard error (sample standard deviation / sqrt(n); n = 1 has none:
null) and n, over the runs that finished and reported a finite value.
aggregate.json also records the sweep's binary, gin files and fixed bindings,
the runs left out (not finished, or no metrics file) and each counted run's
wall time in seconds (its sweep_status.json). For each `sweep.agree` text
field (a verdict), it records every run's value and whether one value holds
across all of them; aggregate.md tabulates `sweep.report_metrics`.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import math
import os
import re
from typing import Any, Optional, Sequence

from realign_jax.plumbing import paths as paths_lib
from realign_jax.plumbing.errors import UserError
from realign_jax.sweeps import plan as plan_lib
from realign_jax.sweeps import runner

RESULTS_JSON = "results.json"
METRICS_JSONL = "metrics.jsonl"


def _number(v: Any) -> Optional[float]:
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return None
  return float(v)


def flatten_json(obj: Any, list_axis: Optional[str] = None) -> dict:
  """Every number of a JSON document: {'a/b': 1.0, 'c[0]': 2.0, 'd[lambdas=0.5]': 3.0}."""
  axis = obj.get(list_axis) if isinstance(obj, dict) and list_axis else None
  out = {}

  def walk(v, key):
    n = _number(v)
    if n is not None:
      out[key] = n
    elif isinstance(v, dict):
      for k, x in v.items():
        walk(x, f"{key}/{k}" if key else str(k))
    elif isinstance(v, list):
      if v and all(isinstance(x, dict) and "lam" in x for x in v):
        # NOTE: evaluate's summary: one group per lambda.
        labels = [f"lam={plan_lib.name_text(x['lam'])}" for x in v]
      elif isinstance(axis, list) and len(axis) == len(v) and key != list_axis:
        labels = [f"{list_axis}={plan_lib.name_text(a)}" for a in axis]
      else:
        labels = [str(i) for i in range(len(v))]
      for label, x in zip(labels, v):
        walk(x, f"{key}[{label}]")
  walk(obj, "")
  return out


def text_field(path: str, name: str) -> Optional[str]:
  """The text at `name` ('a/b': nested keys) of a results.json; None where absent."""
  if not path.endswith(".json"):
    return None
  with open(path) as f:
    v = json.load(f)
  for k in name.split("/"):
    if not isinstance(v, dict) or k not in v:
      return None
    v = v[k]
  return v if isinstance(v, str) else None


def agreement(values: Sequence[Optional[str]]) -> dict:
  """{'values': per run, 'holds': one value in every run, 'value': it, else None}."""
  seen = set(values)
  holds = len(seen) == 1 and None not in seen
  return {"values": list(values), "holds": holds, "value": values[0] if holds else None}


def final_train_metrics(path: str) -> dict:
  """The last row of each split of a trainer's metrics.jsonl, as {'split/name': value}."""
  last = {}
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue  # a line cut short by a kill
      split = row.get("split", "train")
      if split not in last or row.get("step", -1) >= last[split].get("step", -1):
        last[split] = row
  return {f"{split}/{k}": _number(v) for split, row in last.items() for k, v in row.items()
          if k not in ("step", "split") and _number(v) is not None}


def decode_row_means(path: str) -> dict:
  """The mean of each numeric field of a decode file's rows, per lambda (`lam`)."""
  sums = collections.defaultdict(lambda: [0.0, 0])
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      row = json.loads(line)
      lam = row.get("lam")
      suffix = "" if lam is None else f"[lam={plan_lib.name_text(lam)}]"
      for k, v in row.items():
        n = _number(v)
        if n is not None and k not in ("lam", "seed", "row_seed"):
          s = sums[k + suffix]
          s[0] += n
          s[1] += 1
  return {k: s / c for k, (s, c) in sums.items()}


def metrics_path(run_dir: str, metrics_file: Optional[str], run_path: Optional[str]) -> str:
  if metrics_file:
    return os.path.join(run_dir, metrics_file)
  for name in (RESULTS_JSON, METRICS_JSONL):
    if os.path.isfile(os.path.join(run_dir, name)):
      return os.path.join(run_dir, name)
  return os.path.join(run_dir, run_path) if run_path else os.path.join(run_dir, METRICS_JSONL)


def read_metrics(path: str, list_axis: Optional[str] = None, run_dir: Optional[str] = None
                 ) -> dict:
  """A run's metrics file as {name: number}; `run_dir/` is cut from names (evaluate's paths)."""
  try:
    if path.endswith(".json"):
      with open(path) as f:
        flat = flatten_json(json.load(f), list_axis)
      if run_dir:
        flat = {k.replace(run_dir.rstrip("/") + "/", ""): v for k, v in flat.items()}
      return flat
    if os.path.basename(path) == METRICS_JSONL:
      return final_train_metrics(path)
    if path.endswith(".jsonl"):
      return decode_row_means(path)
  except ValueError as e:
    raise UserError(f"{path} is not valid JSON: {str(e).splitlines()[0]}") from e
  raise UserError(f"{path}: a sweep aggregates .json or .jsonl files; set sweep.metrics_file")


def mean_se(values: Sequence[float]) -> tuple:
  """(mean, standard error, n); the standard error of one value is NaN (there is none)."""
  n = len(values)
  if n == 0:
    return math.nan, math.nan, 0
  mean = math.fsum(values) / n
  if n == 1:
    return mean, math.nan, 1
  var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
  return mean, math.sqrt(var / n), n


def _json_number(v: float) -> Optional[float]:
  return None if v is None or not math.isfinite(v) else v


def aggregate(spec: plan_lib.Sweep, runs: Sequence[plan_lib.Run]) -> dict:
  """Reads every finished run's metrics; writes aggregate.json, aggregate.csv and the plot."""
  root = plan_lib.root_dir(spec)
  swept = plan_lib.swept_names(spec)
  groups = collections.OrderedDict()
  missing, seconds = [], {}
  for run in runs:
    key = tuple((k, plan_lib.name_text(v)) for k, v in run.setting)
    group = groups.setdefault(key, {"bindings": dict(run.setting), "runs": [], "values": {}})
    path = metrics_path(run.run_dir, spec.metrics_file, spec.run_path)
    if not runner.is_done(run.run_dir) or not os.path.isfile(path):
      missing.append(run.name)
      continue
    group["runs"].append(run.name)
    seconds[run.name] = runner.read_status(run.run_dir).get("seconds")
    for name in spec.agree:
      group.setdefault("texts", {}).setdefault(name, []).append(text_field(path, name))
    for metric, v in read_metrics(path, spec.list_axis, run.run_dir).items():
      if math.isfinite(v):
        group["values"].setdefault(metric, []).append(v)
  if all(not g["runs"] for g in groups.values()):
    raise UserError(f"no finished run with metrics under {root} (the sweep has {len(runs)} runs)")
  metric_names = sorted({m for g in groups.values() for m in g["values"]})
  settings = []
  for g in groups.values():
    stats = {}
    for m in metric_names:
      mean, se, n = mean_se(g["values"].get(m, []))
      stats[m] = {"mean": _json_number(mean), "se": _json_number(se), "n": n}
    settings.append({"bindings": g["bindings"], "runs": g["runs"], "metrics": stats,
                     "agreement": {name: agreement(g.get("texts", {}).get(name, []))
                                   for name in spec.agree}})
  doc = {"binary": spec.binary, "gin_files": list(spec.gin_files), "fixed": dict(spec.fixed),
         "seed_binding": spec.seed_binding, "seeds": list(spec.seeds),
         "swept": swept, "settings": settings, "missing_runs": missing,
         "run_seconds": seconds,
         "standard_error": "sample standard deviation across seeds / sqrt(n); null for n = 1"}
  unseen = [name for name in spec.agree
            if not any(v is not None for g in groups.values() for v in g.get("texts", {})
                       .get(name, []))]
  if unseen:
    raise UserError(f"sweep.agree names {unseen}, a text field of no run's results.json "
                    f"(e.g. 'dera_verdict/verdict')")
  # NOTE: the table is rendered (and its metrics checked) before any file is written.
  md = markdown(spec, settings, metric_names) if spec.report_metrics else None
  os.makedirs(root, exist_ok=True)
  paths = {"json": os.path.join(root, "aggregate.json"), "csv": os.path.join(root, "aggregate.csv")}
  paths_lib.atomic_write_text(paths["json"], json.dumps(doc, indent=2) + "\n")
  paths_lib.atomic_write_text(paths["csv"], _csv(swept, settings, metric_names))
  if md is not None:
    paths["md"] = os.path.join(root, "aggregate.md")
    paths_lib.atomic_write_text(paths["md"], md)
  if spec.plot_metric:
    paths["plot"] = plot(spec, settings, metric_names, root)
  doc["paths"] = paths
  return doc


def _csv(swept, settings, metric_names) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow([*swept, "metric", "mean", "se", "n"])
  for s in settings:
    for m in metric_names:
      st = s["metrics"][m]
      w.writerow([*(plan_lib.name_text(s["bindings"][k]) for k in swept), m,
                  "" if st["mean"] is None else repr(st["mean"]),
                  "" if st["se"] is None else repr(st["se"]), st["n"]])
  return buf.getvalue()


def _cell(st: Optional[dict]) -> str:
  if not st or st["mean"] is None:
    return "-"
  se = "n/a" if st["se"] is None else f"{st['se']:.3f}"
  return f"{st['mean']:.3f} ± {se} ({st['n']})"


def _label_key(label: str) -> tuple:
  """'[lambdas=10.0]' sorts after '[lambdas=2.0]': by the number where the value is one."""
  value = label.strip("[]").split("=", 1)[-1]
  try:
    return (0, float(value), value)
  except ValueError:
    return (1, 0.0, value)


def markdown(spec: plan_lib.Sweep, settings: list, metric_names: list) -> str:
  """aggregate.md: `report_metrics` as mean ± standard error (n) across seeds, per setting.

  A metric that is a list along `list_axis` (name[axis=v]) is a column whose
  rows are the axis values; a scalar is listed on its own line.
  """
  unknown = [m for m in spec.report_metrics
             if m not in metric_names and not any(n.startswith(m + "[") for n in metric_names)]
  if unknown:
    raise UserError(f"sweep.report_metrics names {unknown}, not metrics of any run; e.g. "
                    f"{metric_names[:8]}")
  columns = [m for m in spec.report_metrics if m not in metric_names]
  scalars = [m for m in spec.report_metrics if m in metric_names]
  lines = [f"# {spec.binary}: mean ± standard error across seeds (n runs)", "",
           f"Seeds: {list(spec.seeds)} (binding {spec.seed_binding}); standard error: the "
           "sample standard deviation across seeds / sqrt(n).", ""]
  for s in settings:
    label = ", ".join(f"{k}={plan_lib.name_text(v)}" for k, v in s["bindings"].items())
    lines += [f"## {label or 'all runs'} ({len(s['runs'])} runs: {', '.join(s['runs'])})", ""]
    labels = []
    for n in metric_names:
      for m in columns:
        if n.startswith(m + "[") and n[len(m):] not in labels:
          labels.append(n[len(m):])
    labels.sort(key=_label_key)
    if columns:
      lines.append("| " + " | ".join([spec.list_axis or "entry", *columns]) + " |")
      lines.append("|" + "---|" * (len(columns) + 1))
      for lab in labels:
        head = lab.strip("[]").split("=", 1)[-1]
        lines.append("| " + " | ".join([head, *(_cell(s["metrics"].get(m + lab))
                                               for m in columns)]) + " |")
      lines.append("")
    for m in scalars:
      lines.append(f"- {m}: {_cell(s['metrics'][m])}")
    for name, a in s.get("agreement", {}).items():
      if a["holds"]:
        lines.append(f"- {name}: **{a['value']}** in every run")
      elif None in a["values"]:
        lines.append(f"- {name}: missing in some runs ({', '.join(map(str, a['values']))})")
      else:
        lines.append(f"- {name}: differs across runs ({', '.join(map(str, a['values']))}): no "
                     "conclusion holds across seeds")
    lines.append("")
  return "\n".join(lines)


def plot(spec: plan_lib.Sweep, settings: list, metric_names: list, root: str) -> str:
  """`plot_metric` against `plot_x`, one line per value of the other swept bindings."""
  metric, x = spec.plot_metric, spec.plot_x
  if metric not in metric_names:
    close = [m for m in metric_names if metric.split("[")[0].split("/")[-1] in m][:8]
    raise UserError(f"sweep.plot_metric = {metric!r} is not a metric of any run; e.g. "
                    f"{close or metric_names[:8]}")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  lines = collections.OrderedDict()
  for s in settings:
    xv = _number(s["bindings"][x])
    if xv is None:
      raise UserError(f"sweep.plot_x = {x!r} takes the value {s['bindings'][x]!r}; the plot "
                      f"needs numbers")
    other = tuple((k, v) for k, v in s["bindings"].items() if k != x)
    st = s["metrics"][metric]
    if st["mean"] is not None:
      lines.setdefault(other, []).append((xv, st["mean"], st["se"]))
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for other, pts in lines.items():
    pts.sort()
    label = ", ".join(f"{k}={plan_lib.name_text(v)}" for k, v in other) or None
    ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                yerr=[0.0 if p[2] is None else p[2] for p in pts], marker="o", capsize=3,
                label=label)
  if spec.plot_log_x:
    ax.set_xscale("log")
  ax.set_xlabel(x)
  ax.set_ylabel(metric)
  n = sorted({s["metrics"][metric]["n"] for s in settings})
  ax.set_title(f"mean +- 1 s.e. across seeds (n = {', '.join(map(str, n))})", fontsize=9)
  if any(lab for lab in lines if lab):
    ax.legend(fontsize=7)
  fig.tight_layout()
  stem = re.sub(r"[^A-Za-z0-9._=+-]", "_", f"{metric}_vs_{x}".replace("]", ""))
  path = os.path.join(root, stem + ".png")
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)
  return path
