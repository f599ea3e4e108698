"""A sweep file's settings (gin configurable `sweep`) and the runs they expand into.

Runs are the product of the grid's lists, times the rows of the zipped lists,
times the seeds. Each run's directory under the root is named from the
bindings that vary (grid, zip, seed), in that order: `BETA=0.1,SEED=1`.
Nothing here starts anything; every check raises a one-line `UserError`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import sys
from typing import Any, Mapping, Optional, Sequence

from realign_jax.plumbing import gin_utils
from realign_jax.plumbing.errors import UserError

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_./]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")
# NOTE: most file systems cap one path component at 255 bytes.
MAX_NAME_BYTES = 255


@dataclasses.dataclass(frozen=True)
class Sweep:
  """What a sweep file binds (as `sweep.X = ...`); see configs/sweeps/*.gin.

  binary: the module run as `python -m binary` (realign_jax.train, .decode,
    .evaluate, a study under realign_jax.experiments).
  gin_files: the base config(s), passed as --gin_file in this order.
  root: the sweep's directory; every run gets a subdirectory.
  run_dir_binding: the binding that receives each run's path (e.g. MODEL_DIR).
  run_path: if set, that binding receives `<run dir>/<run_path>` (a decode's
    OUTPUT_FILE) instead of the run directory itself.
  fixed: bindings every run gets, {name: value}.
  grid: {name: [values]}: every combination.
  zip: {name: [values]}: lists of one length, taken row by row.
  seeds: the seeds; each setting runs once per seed.
  seed_binding: the binding that receives the seed (e.g. SEED).
  executor: @LocalExecutor() (default: one run at a time) or @SlurmExecutor().
  max_retries: how many times a failed run is started again (exit status 2,
    a configuration error, is not retried: it would fail the same way).
  metrics_file: the run's file to aggregate, relative to its directory
    (default: results.json, else metrics.jsonl, else the run_path file).
  list_axis: a results.json list that labels the entries of the other lists
    of its length (e.g. 'lambdas': dera_reward[lambdas=0.5]); else [index].
  plot_metric, plot_x: the plot: a metric against a swept binding, one line per
    value of the other swept bindings, error bars one standard error across seeds.
  plot_log_x: a logarithmic x axis.
  agree: text fields of the runs' results.json ('dera_verdict/verdict') whose
    value across seeds aggregate.json reports, with whether it holds in all.
  report_metrics: metrics tabulated in aggregate.md as mean ± standard error
    (n) across seeds; a results.json list named here is one column, its
    entries rows labelled by `list_axis`.
  """
  binary: str
  gin_files: Sequence[str]
  root: str
  run_dir_binding: str
  run_path: Optional[str] = None
  fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  grid: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
  zip: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
  seeds: Sequence[int] = ()
  seed_binding: Optional[str] = None
  executor: Any = None
  max_retries: int = 1
  metrics_file: Optional[str] = None
  list_axis: Optional[str] = None
  plot_metric: Optional[str] = None
  plot_x: Optional[str] = None
  plot_log_x: bool = False
  agree: Sequence[str] = ()
  report_metrics: Sequence[str] = ()


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep."""
  name: str                       # its directory's name under the root
  run_dir: str                    # absolute
  setting: tuple                  # ((name, value), ...) swept, without the seed
  seed: Optional[int]
  bindings: dict                  # every binding the run gets: {name: value}
  command: tuple                  # the argv, python first

  def describe(self) -> str:
    return shlex.join(self.command)


def gin_literal(value: Any, where: str) -> str:
  """The gin text of a Python value (what `--gin.NAME=` receives)."""
  if value is None or isinstance(value, (bool, int, str)):
    return repr(value)
  if isinstance(value, float):
    if not math.isfinite(value):
      raise UserError(f"{where} = {value} is not finite; gin has no literal for it")
    return repr(value)
  if isinstance(value, (list, tuple)):
    inner = ", ".join(gin_literal(v, where) for v in value)
    return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
  if isinstance(value, dict):
    return "{" + ", ".join(f"{gin_literal(k, where)}: {gin_literal(v, where)}"
                           for k, v in value.items()) + "}"
  raise UserError(f"{where} = {value!r} is a {type(value).__name__}; a sweep binds numbers, "
                  f"strings, booleans, None and lists, tuples or dicts of them")


def name_text(value: Any) -> str:
  """A value as it appears in a run directory's name (before sanitising)."""
  if isinstance(value, str):
    return value
  if isinstance(value, float):
    return repr(value)
  if value is None or isinstance(value, (bool, int)):
    return str(value)
  return json.dumps(value, separators=(",", ":"), sort_keys=True)


def run_name(pairs: Sequence[tuple]) -> str:
  """`A=1,B=x`: each name and value with every character outside [A-Za-z0-9._=+-] as '_'."""
  return ",".join(_UNSAFE.sub("_", f"{k}={name_text(v)}") for k, v in pairs)


def _check_name(name: Any, where: str) -> str:
  if not isinstance(name, str) or not _NAME_RE.match(name):
    raise UserError(f"{where}: {name!r} is not a gin binding name (e.g. BETA or PPO.beta)")
  return name


def _as_list(values: Any, where: str) -> list:
  if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
    raise UserError(f"{where} must be a list of values, got {values!r}")
  values = list(values)
  if not values:
    raise UserError(f"{where} is empty; give at least one value")
  return values


def expand(spec: Sweep, *, cwd: Optional[str] = None, python: str = sys.executable) -> list:
  """Checks `spec` and returns its runs (nothing is written or started)."""
  cwd = cwd or os.getcwd()
  if not isinstance(spec.binary, str) or not re.match(r"^[A-Za-z_][\w.]*$", spec.binary or ""):
    raise UserError(f"sweep.binary = {spec.binary!r} is not a module name (e.g. "
                    f"'realign_jax.train')")
  if isinstance(spec.gin_files, str) or not spec.gin_files:
    raise UserError(f"sweep.gin_files = {spec.gin_files!r}: give a list of gin files, e.g. "
                    f"['configs/sft/builtin_tiny.gin']")
  if not isinstance(spec.root, str) or not spec.root:
    raise UserError("sweep.root is empty; give the sweep's directory")
  root = os.path.abspath(os.path.join(cwd, spec.root))
  if os.path.exists(root) and not os.path.isdir(root):
    raise UserError(f"sweep.root {spec.root} exists and is not a directory")
  dir_binding = _check_name(spec.run_dir_binding, "sweep.run_dir_binding")
  if spec.run_path is not None and (not isinstance(spec.run_path, str) or not spec.run_path
                                    or os.path.isabs(spec.run_path)):
    raise UserError(f"sweep.run_path = {spec.run_path!r} must be a relative path (e.g. "
                    f"'dera.jsonl') or None")
  if not isinstance(spec.max_retries, int) or spec.max_retries < 0:
    raise UserError(f"sweep.max_retries = {spec.max_retries!r} must be an integer >= 0")
  for what in ("fixed", "grid", "zip"):
    if not isinstance(getattr(spec, what), Mapping):
      shape = "{binding: value}" if what == "fixed" else "{binding: [values]}"
      raise UserError(f"sweep.{what} must be a dict {shape}, got {getattr(spec, what)!r}")

  # ---- who binds what: each name once ------------------------------------------------
  owner = {}
  def claim(name, where):
    _check_name(name, where)
    if name in owner:
      raise UserError(f"binding {name} is set twice: in {owner[name]} and in {where}")
    owner[name] = where
  claim(dir_binding, "sweep.run_dir_binding")
  for what in ("fixed", "grid", "zip"):
    for name in getattr(spec, what):
      claim(name, f"sweep.{what}")
  seeds = list(spec.seeds or ())
  if spec.seed_binding is not None:
    claim(spec.seed_binding, "sweep.seed_binding")
    if not seeds:
      raise UserError(f"sweep.seeds is empty but sweep.seed_binding = {spec.seed_binding!r}; "
                      f"give the seeds, e.g. [0, 1, 2]")
  elif seeds:
    raise UserError(f"sweep.seeds = {seeds} but no sweep.seed_binding receives them (e.g. 'SEED')")
  for s in seeds:
    if not isinstance(s, int) or isinstance(s, bool):
      raise UserError(f"sweep.seeds holds {s!r}; seeds are integers")
  if len(set(seeds)) != len(seeds):
    raise UserError(f"sweep.seeds = {seeds} repeats a seed")

  grid = {k: _as_list(v, f"sweep.grid[{k!r}]") for k, v in spec.grid.items()}
  zipped = {k: _as_list(v, f"sweep.zip[{k!r}]") for k, v in spec.zip.items()}
  lengths = {k: len(v) for k, v in zipped.items()}
  if len(set(lengths.values())) > 1:
    raise UserError("sweep.zip lists have different lengths: " +
                    ", ".join(f"{k} has {n}" for k, n in lengths.items()))
  if not grid and not zipped and not seeds:
    raise UserError("the sweep has no runs: give sweep.grid, sweep.zip or sweep.seeds")
  x = spec.plot_x
  if x is not None and x not in grid and x not in zipped:
    raise UserError(f"sweep.plot_x = {x!r} is not a swept binding (seeds are averaged over); "
                    f"choose one of {sorted(list(grid) + list(zipped))}")
  for field in ("agree", "report_metrics"):
    value = getattr(spec, field)
    if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
      raise UserError(f"sweep.{field} = {value!r}: give a list of names, e.g. "
                      f"{['dera_verdict/verdict'] if field == 'agree' else ['dera_reward']}")
  if (spec.plot_x is None) != (spec.plot_metric is None):
    raise UserError("give both sweep.plot_metric and sweep.plot_x, or neither")

  # ---- the runs ------------------------------------------------------------------------
  files = [os.path.abspath(gin_utils.resolve_gin_file(f)) for f in spec.gin_files]
  grid_rows = [tuple(zip(grid, vals)) for vals in itertools.product(*grid.values())]
  zip_rows = ([tuple(zip(zipped, vals)) for vals in zip(*zipped.values())] if zipped else [()])
  runs, by_name = [], {}
  for g, z in itertools.product(grid_rows, zip_rows):
    setting = g + z
    for seed in (seeds or [None]):
      pairs = setting + (((spec.seed_binding, seed),) if seed is not None else ())
      name = run_name(pairs)
      if name in by_name:
        raise UserError(f"two runs map to the run directory {name!r}: {dict(by_name[name])} and "
                        f"{dict(pairs)}; make the swept values distinct")
      if len(name.encode()) > MAX_NAME_BYTES:
        raise UserError(f"run directory name {name[:60]}... is {len(name.encode())} bytes, over "
                        f"{MAX_NAME_BYTES}; sweep fewer or shorter values")
      by_name[name] = pairs
      run_dir = os.path.join(root, name)
      target = os.path.join(run_dir, spec.run_path) if spec.run_path else run_dir
      bindings = {dir_binding: target, **dict(spec.fixed), **dict(pairs)}
      args = [python, "-m", spec.binary, *(f"--gin_file={f}" for f in files)]
      args += [f"--gin.{k}={gin_literal(v, k)}" for k, v in bindings.items()]
      runs.append(Run(name=name, run_dir=run_dir, setting=setting, seed=seed,
                      bindings=bindings, command=tuple(args)))
  return runs


def root_dir(spec: Sweep, cwd: Optional[str] = None) -> str:
  return os.path.abspath(os.path.join(cwd or os.getcwd(), spec.root))


def swept_names(spec: Sweep) -> list:
  return list(spec.grid) + list(spec.zip)
